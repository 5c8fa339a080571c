"""sysutil.keep_heap_top, which the offline re-encryption relies on for its speed (issue 13)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Worker threads make and drop 1 MiB results, as the offline engine's cipher workers do.
_CHURN = r"""
import os, resource, sys
from concurrent.futures import ThreadPoolExecutor
if sys.argv[1] == "keep":
    from vmfs_crypt.sysutil import keep_heap_top
    assert keep_heap_top(256 << 20)
src = os.urandom(1 << 20)
def work(_):
    return len([bytes(bytearray(src)) for _ in range(8)])
pool = ThreadPoolExecutor(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    list(pool.map(work, range(8)))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    return int(out.stdout.strip())


def test_keep_heap_top_stops_page_faults_for_buffers_made_over_and_over():
    without, kept = _page_faults("none"), _page_faults("keep")
    # 320 MiB churned: without it each buffer is faulted in afresh (about 80k faults); with it the
    # heap's pages are reused. glibc's behaviour, so a large margin.
    assert kept * 10 < without, (kept, without)

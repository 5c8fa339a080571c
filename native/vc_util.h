/* Small helpers shared by the native sources. */
#ifndef VC_UTIL_H
#define VC_UTIL_H

#include <stdio.h>
#include <stdlib.h>

/* A pthread call on our own, correctly used object that fails means memory corruption or a
 * broken invariant: stop rather than run on with a lock in an unknown state. */
#define VC_MUST(call)                                                                        \
    do {                                                                                     \
        int vc_must_rc_ = (call);                                                            \
        if (vc_must_rc_ != 0) {                                                              \
            fprintf(stderr, "vmfs_crypt native: %s failed (%d) at %s:%d\n", #call, vc_must_rc_, \
                    __FILE__, __LINE__);                                                     \
            abort();                                                                         \
        }                                                                                    \
    } while (0)

#endif

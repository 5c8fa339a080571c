/*
 * vmfs_crypt._native: the Python binding of the native sector cipher and data path.
 *
 * Python is touched only here, and never on the FUSE read/write path: libfuse threads
 * run fuse_entry.c / datapath.c / xts_batch.c without the GIL. The only call back into
 * Python from those threads is the log hook, on a data fault, which takes the GIL.
 */
#define PY_SSIZE_T_CLEAN
#define _FILE_OFFSET_BITS 64
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>

#include "datapath.h"
#include "fuse_entry.h"
#include "xts_batch.h"

#define SECTOR_RANGE_MSG "sector numbers must lie in 0..2^64-1"

/* ABI of the entries handle_read/handle_write call: the one last installed (3 by default). */
static int current_abi = 3;

static PyObject *set_errno_error(int neg_errno)
{
    if (neg_errno == -ENOMEM)
        return PyErr_NoMemory();
    errno = -neg_errno;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* -- SectorCipher ---------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD vc_xts *x;
} SectorCipherObject;

static PyTypeObject SectorCipher_Type;

static PyObject *SectorCipher_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"dek", NULL};
    Py_buffer view;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:SectorCipher", kwlist, &view))
        return NULL;
    if (view.len != (Py_ssize_t)VC_DEK_SIZE) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "a DEK is 64 bytes (XTS-AES-256)");
        return NULL;
    }
    uint8_t dek[VC_DEK_SIZE];
    memcpy(dek, view.buf, sizeof(dek));
    PyBuffer_Release(&view);
    vc_xts *x = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vc_xts_new(dek, &x);
    Py_END_ALLOW_THREADS
    OPENSSL_cleanse(dek, sizeof(dek));
    if (rc == -EINVAL) {
        /* IEEE 1619-2018 requires distinct halves; cryptography refuses them too. */
        PyErr_SetString(PyExc_ValueError, "the two halves of an XTS key must differ");
        return NULL;
    }
    if (rc == -ENOMEM)
        return PyErr_NoMemory();
    if (rc != 0) {
        PyErr_SetString(PyExc_RuntimeError, "libcrypto failed to set up the XTS key");
        return NULL;
    }
    SectorCipherObject *self = (SectorCipherObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        vc_xts_unref(x);
        return NULL;
    }
    self->x = x;
    return (PyObject *)self;
}

static void SectorCipher_dealloc(SectorCipherObject *self)
{
    vc_xts_unref(self->x);
    self->x = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *SectorCipher_repr(PyObject *self)
{
    (void)self;
    return PyUnicode_FromString("SectorCipher(<key hidden>)");
}

/* first_sector_no: an int in 0..2^64-1 (ValueError otherwise, as vmfs_crypt.xts). */
static int sector_arg(PyObject *obj, uint64_t *out)
{
    PyObject *idx = PyNumber_Index(obj);
    if (idx == NULL)
        return -1;
    const unsigned long long v = PyLong_AsUnsignedLongLong(idx);
    Py_DECREF(idx);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, SECTOR_RANGE_MSG);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static PyObject *cipher_run(SectorCipherObject *self, PyObject *const *args, Py_ssize_t nargs, int enc)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 arguments (first_sector_no, data)", enc ? "encrypt" : "decrypt");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) != 0)
        return NULL;
    if (view.len == 0) { /* as vmfs_crypt.xts: empty in, empty out, before any check */
        PyBuffer_Release(&view);
        return PyByteArray_FromStringAndSize(NULL, 0);
    }
    uint64_t first = 0;
    if (sector_arg(args[0], &first) != 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *out = PyByteArray_FromStringAndSize(NULL, view.len);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const uint8_t *in = view.buf;
    uint8_t *dst = (uint8_t *)PyByteArray_AS_STRING(out);
    const size_t len = (size_t)view.len;
    int rc;
    /* `view` pins the input (a bytearray cannot be resized while exported); `out` is not
     * visible to any other thread yet. */
    Py_BEGIN_ALLOW_THREADS
    rc = enc ? vc_xts_encrypt(self->x, first, in, dst, len) : vc_xts_decrypt(self->x, first, in, dst, len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (rc != 0) {
        Py_DECREF(out);
        if (rc == -EINVAL)
            PyErr_SetString(PyExc_ValueError, SECTOR_RANGE_MSG);
        else if (rc == -ENOMEM)
            PyErr_NoMemory();
        else
            PyErr_SetString(PyExc_RuntimeError, "libcrypto failed in the XTS sector cipher");
        return NULL;
    }
    return out;
}

static PyObject *SectorCipher_encrypt(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return cipher_run((SectorCipherObject *)self, args, nargs, 1);
}

static PyObject *SectorCipher_decrypt(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return cipher_run((SectorCipherObject *)self, args, nargs, 0);
}

static PyObject *SectorCipher_reduce(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    PyErr_SetString(PyExc_TypeError, "a SectorCipher holds key material and cannot be pickled or copied");
    return NULL;
}

static PyMethodDef SectorCipher_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))SectorCipher_encrypt, METH_FASTCALL,
     "encrypt(first_sector_no, plaintext) -> bytearray\n\nEncrypt consecutive sectors starting at "
     "first_sector_no; only the last may be partial."},
    {"decrypt", (PyCFunction)(void (*)(void))SectorCipher_decrypt, METH_FASTCALL,
     "decrypt(first_sector_no, ciphertext) -> bytearray\n\nDecrypt consecutive sectors starting at "
     "first_sector_no; only the last may be partial."},
    {"__reduce__", SectorCipher_reduce, METH_NOARGS, NULL},
    {"__reduce_ex__", (PyCFunction)(void (*)(void))SectorCipher_reduce, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SectorCipher_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vmfs_crypt._native.SectorCipher",
    .tp_basicsize = sizeof(SectorCipherObject),
    .tp_dealloc = (destructor)SectorCipher_dealloc,
    .tp_repr = SectorCipher_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SectorCipher(dek)\n\nXTS-AES-256 over 512-byte sectors, tweak = sector number "
              "(aes-xts-plain64); byte-identical to vmfs_crypt.xts.SectorCipher. Thread-safe; "
              "the GIL is released while it works.",
    .tp_methods = SectorCipher_methods,
    .tp_new = SectorCipher_new,
};

/* -- FileState --------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD vc_file *f;
    PyObject *cipher; /* the SectorCipher or None */
} FileStateObject;

static PyTypeObject FileState_Type;

/* A str as the bytes its file name had (surrogateescape), without NUL. */
static PyObject *name_bytes(PyObject *name)
{
    if (!PyUnicode_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "name must be a str");
        return NULL;
    }
    PyObject *b = PyUnicode_AsEncodedString(name, "utf-8", "surrogateescape");
    if (b == NULL)
        return NULL;
    if (memchr(PyBytes_AS_STRING(b), '\0', (size_t)PyBytes_GET_SIZE(b)) != NULL) {
        Py_DECREF(b);
        PyErr_SetString(PyExc_ValueError, "name must not contain NUL");
        return NULL;
    }
    return b;
}

static PyObject *FileState_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"cipher", "name", NULL};
    PyObject *cipher, *name;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:FileState", kwlist, &cipher, &name))
        return NULL;
    if (cipher != Py_None && !PyObject_TypeCheck(cipher, &SectorCipher_Type)) {
        PyErr_SetString(PyExc_TypeError, "cipher must be a vmfs_crypt._native.SectorCipher or None");
        return NULL;
    }
    PyObject *nb = name_bytes(name);
    if (nb == NULL)
        return NULL;
    vc_file *f = NULL;
    const int rc = vc_file_new(cipher == Py_None ? NULL : ((SectorCipherObject *)cipher)->x, PyBytes_AS_STRING(nb), &f);
    Py_DECREF(nb);
    if (rc != 0)
        return set_errno_error(rc);
    FileStateObject *self = (FileStateObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        vc_file_unref(f);
        return NULL;
    }
    self->f = f;
    Py_INCREF(cipher);
    self->cipher = cipher;
    return (PyObject *)self;
}

static void FileState_dealloc(FileStateObject *self)
{
    vc_file_unref(self->f);
    self->f = NULL;
    Py_CLEAR(self->cipher);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *FileState_repr(FileStateObject *self)
{
    char name[512];
    (void)vc_file_name(self->f, name, sizeof(name));
    PyObject *n = PyUnicode_DecodeUTF8(name, (Py_ssize_t)strlen(name), "surrogateescape");
    if (n == NULL)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("FileState(%R, encrypted=%s, revoked=%s)", n,
                                       vc_file_cipher(self->f) ? "True" : "False",
                                       vc_file_revoked(self->f) ? "True" : "False");
    Py_DECREF(n);
    return r;
}

static PyObject *FileState_acquire_read(FileStateObject *self, PyObject *unused)
{
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    vc_file_lock_read(self->f);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *FileState_release_read(FileStateObject *self, PyObject *unused)
{
    (void)unused;
    if (vc_file_unlock_read(self->f) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "release_read() without a matching acquire_read()");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *FileState_acquire_write(FileStateObject *self, PyObject *unused)
{
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    vc_file_lock_write(self->f);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *FileState_release_write(FileStateObject *self, PyObject *unused)
{
    (void)unused;
    if (vc_file_unlock_write(self->f) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "release_write() without a matching acquire_write()");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* acquire_read_span / acquire_write_span: take the lock with `lock`, for (offset, size). */
static PyObject *acquire_span(FileStateObject *self, PyObject *args, const char *format,
                              void (*lock)(vc_file *, uint64_t, uint64_t))
{
    unsigned long long off, size;
    if (!PyArg_ParseTuple(args, format, &off, &size))
        return NULL;
    if (off > (unsigned long long)INT64_MAX || size > (unsigned long long)SSIZE_MAX) {
        PyErr_SetString(PyExc_ValueError, "offset or size out of range");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    lock(self->f, (uint64_t)off, (uint64_t)size);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *FileState_acquire_read_span(FileStateObject *self, PyObject *args)
{
    return acquire_span(self, args, "KK:acquire_read_span", vc_file_lock_read_span);
}

static PyObject *FileState_acquire_write_span(FileStateObject *self, PyObject *args)
{
    return acquire_span(self, args, "KK:acquire_write_span", vc_file_lock_write_span);
}

static PyObject *FileState_set_hot(FileStateObject *self, PyObject *args)
{
    unsigned long long lo, hi;
    if (!PyArg_ParseTuple(args, "KK:set_hot", &lo, &hi))
        return NULL;
    const int rc = vc_file_set_hot(self->f, (uint64_t)lo, (uint64_t)hi);
    if (rc == -EPERM) {
        PyErr_SetString(PyExc_RuntimeError, "set_hot() needs the write lock held");
        return NULL;
    }
    if (rc != 0) {
        PyErr_SetString(PyExc_ValueError, "set_hot(lo, hi) needs lo < hi and lo at a sector boundary");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *FileState_clear_hot(FileStateObject *self, PyObject *unused)
{
    (void)unused;
    if (vc_file_clear_hot(self->f) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "clear_hot() needs the write lock held");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *FileState_get_revoked(FileStateObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(vc_file_revoked(self->f));
}

static int FileState_set_revoked(FileStateObject *self, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete revoked");
        return -1;
    }
    const int t = PyObject_IsTrue(value);
    if (t < 0)
        return -1;
    vc_file_set_revoked(self->f, t);
    return 0;
}

static PyObject *FileState_get_name(FileStateObject *self, void *closure)
{
    (void)closure;
    char small[256];
    const size_t len = vc_file_name(self->f, small, sizeof(small));
    if (len < sizeof(small))
        return PyUnicode_DecodeUTF8(small, (Py_ssize_t)len, "surrogateescape");
    char *big = PyMem_Malloc(len + 1);
    if (big == NULL)
        return PyErr_NoMemory();
    const size_t len2 = vc_file_name(self->f, big, len + 1);
    PyObject *r = PyUnicode_DecodeUTF8(big, (Py_ssize_t)(len2 < len ? len2 : len), "surrogateescape");
    PyMem_Free(big);
    return r;
}

static int FileState_set_name(FileStateObject *self, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete name");
        return -1;
    }
    PyObject *nb = name_bytes(value);
    if (nb == NULL)
        return -1;
    const int rc = vc_file_set_name(self->f, PyBytes_AS_STRING(nb));
    Py_DECREF(nb);
    if (rc != 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static PyObject *FileState_get_cipher(FileStateObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->cipher);
    return self->cipher;
}

static PyObject *FileState_set_cipher(FileStateObject *self, PyObject *cipher)
{
    if (!PyObject_TypeCheck(cipher, &SectorCipher_Type)) {
        PyErr_SetString(PyExc_TypeError, "cipher must be a vmfs_crypt._native.SectorCipher");
        return NULL;
    }
    const int rc = vc_file_set_cipher(self->f, ((SectorCipherObject *)cipher)->x);
    if (rc == -EPERM) {
        PyErr_SetString(PyExc_RuntimeError, "set_cipher() needs the write lock held");
        return NULL;
    }
    if (rc != 0)
        return set_errno_error(rc);
    Py_INCREF(cipher);
    Py_SETREF(self->cipher, cipher);
    Py_RETURN_NONE;
}

static PyGetSetDef FileState_getset[] = {
    {"revoked", (getter)FileState_get_revoked, (setter)FileState_set_revoked,
     "True: reads and writes of this file fail with EACCES (the KEK was revoked).", NULL},
    {"name", (getter)FileState_get_name, (setter)FileState_set_name, "Display name used in log records.", NULL},
    {"cipher", (getter)FileState_get_cipher, NULL, "The SectorCipher, or None for a plain file.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef FileState_methods[] = {
    {"acquire_read", (PyCFunction)FileState_acquire_read, METH_NOARGS,
     "Take the file's lock shared (waits with the GIL released). Not recursive."},
    {"release_read", (PyCFunction)FileState_release_read, METH_NOARGS, NULL},
    {"acquire_write", (PyCFunction)FileState_acquire_write, METH_NOARGS,
     "Take the file's lock exclusive (waits with the GIL released). Not recursive."},
    {"release_write", (PyCFunction)FileState_release_write, METH_NOARGS, NULL},
    {"acquire_read_span", (PyCFunction)FileState_acquire_read_span, METH_VARARGS,
     "acquire_read_span(offset, size): acquire_read, waiting also while the request touches the hot zone."},
    {"acquire_write_span", (PyCFunction)FileState_acquire_write_span, METH_VARARGS,
     "acquire_write_span(offset, size): acquire_write, waiting also while the request touches the hot zone."},
    {"set_hot", (PyCFunction)FileState_set_hot, METH_VARARGS,
     "set_hot(lo, hi): bytes [lo, hi) are rewritten by an online operation (issue 10); the caller holds the write lock."},
    {"clear_hot", (PyCFunction)FileState_clear_hot, METH_NOARGS,
     "No hot zone any more; its waiters go on when the caller releases the write lock."},
    {"set_cipher", (PyCFunction)FileState_set_cipher, METH_O,
     "Serve the file under another SectorCipher from now on; the caller holds the write lock."},
    {"__reduce__", SectorCipher_reduce, METH_NOARGS, NULL},
    {"__reduce_ex__", (PyCFunction)(void (*)(void))SectorCipher_reduce, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FileState_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vmfs_crypt._native.FileState",
    .tp_basicsize = sizeof(FileStateObject),
    .tp_dealloc = (destructor)FileState_dealloc,
    .tp_repr = (reprfunc)FileState_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "FileState(cipher, name)\n\nShared state of one backing file: its SectorCipher (None: a "
              "plain file), its reader/writer lock (the same one the native read/write take), a "
              "revoked flag and a display name for log records.",
    .tp_methods = FileState_methods,
    .tp_getset = FileState_getset,
    .tp_new = FileState_new,
};

/* -- module functions ------------------------------------------------------------------ */

static int fh_arg(PyObject *obj, uint64_t *out)
{
    PyObject *idx = PyNumber_Index(obj);
    if (idx == NULL)
        return -1;
    const unsigned long long v = PyLong_AsUnsignedLongLong(idx);
    Py_DECREF(idx);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "a file handle is an int in 0..2^64-1");
        }
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static PyObject *mod_register(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *fh_obj, *state;
    int fd;
    if (!PyArg_ParseTuple(args, "OiO!:register", &fh_obj, &fd, &FileState_Type, &state))
        return NULL;
    uint64_t fh;
    if (fh_arg(fh_obj, &fh) != 0)
        return NULL;
    const int rc = vc_register(fh, fd, ((FileStateObject *)state)->f);
    if (rc == -EEXIST) {
        PyErr_Format(PyExc_ValueError, "file handle %llu is already registered", (unsigned long long)fh);
        return NULL;
    }
    if (rc != 0)
        return set_errno_error(rc);
    Py_RETURN_NONE;
}

static PyObject *mod_unregister(PyObject *mod, PyObject *fh_obj)
{
    (void)mod;
    uint64_t fh;
    if (fh_arg(fh_obj, &fh) != 0)
        return NULL;
    if (vc_unregister(fh) != 0) {
        PyErr_SetObject(PyExc_KeyError, fh_obj);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *mod_install(PyObject *mod, PyObject *args, PyObject *kwds)
{
    (void)mod;
    static char *kwlist[] = {"fallback_read_addr", "fallback_write_addr", "fuse_major", NULL};
    PyObject *r_obj, *w_obj;
    int major = 3;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$i:install", kwlist, &r_obj, &w_obj, &major))
        return NULL;
    uintptr_t fr = 0, fw = 0, nr = 0, nw = 0;
    if (r_obj != Py_None) {
        fr = (uintptr_t)PyLong_AsUnsignedLongLong(r_obj);
        if (PyErr_Occurred())
            return NULL;
    }
    if (w_obj != Py_None) {
        fw = (uintptr_t)PyLong_AsUnsignedLongLong(w_obj);
        if (PyErr_Occurred())
            return NULL;
    }
    if (major != 2 && major != 3) {
        PyErr_SetString(PyExc_ValueError, "fuse_major must be 3 (libfuse 3) or 2 (libfuse 2.9)");
        return NULL;
    }
    if (vc_fuse_install(major, fr, fw, &nr, &nw) != 0) {
        PyErr_SetString(PyExc_ValueError, "a fallback must not be one of the native entries (it would recurse)");
        return NULL;
    }
    current_abi = major;
    return Py_BuildValue("(KK)", (unsigned long long)nr, (unsigned long long)nw);
}

/* The log hook, on a libfuse (or any) thread with no lock of ours held. */
static PyObject *log_callable; /* read and replaced with the GIL held */

static void py_log_hook(const char *message)
{
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *cb = log_callable;
    Py_XINCREF(cb);
    if (cb != NULL) {
        PyObject *msg = PyUnicode_DecodeUTF8(message, (Py_ssize_t)strlen(message), "surrogateescape");
        PyObject *r = msg != NULL ? PyObject_CallOneArg(cb, msg) : NULL;
        if (r == NULL)
            PyErr_WriteUnraisable(cb);
        Py_XDECREF(r);
        Py_XDECREF(msg);
        Py_DECREF(cb);
    }
    PyGILState_Release(g);
}

static PyObject *mod_set_log(PyObject *mod, PyObject *cb)
{
    (void)mod;
    if (cb != Py_None && !PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "set_log() takes a callable or None");
        return NULL;
    }
    PyObject *old = log_callable;
    if (cb == Py_None) {
        log_callable = NULL;
        vc_set_log_hook(NULL);
    } else {
        Py_INCREF(cb);
        log_callable = cb;
        vc_set_log_hook(py_log_hook);
    }
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *mod_handle_read(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *fh_obj;
    Py_ssize_t size;
    long long off;
    if (!PyArg_ParseTuple(args, "OnL:handle_read", &fh_obj, &size, &off))
        return NULL;
    uint64_t fh;
    if (fh_arg(fh_obj, &fh) != 0)
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must not be negative");
        return NULL;
    }
    /* Allocate no more than the file holds past `off` (a read racing with growth reads
     * what was there); the read itself is the FUSE entry's. */
    vc_handle *h = vc_handle_get(fh);
    if (h != NULL) {
        int64_t fsize = 0;
        if (vc_handle_size(h, &fsize) == 0 && off >= 0)
            size = fsize <= off ? 0 : (fsize - off < (int64_t)size ? (Py_ssize_t)(fsize - off) : size);
        vc_handle_put(h);
    } else if (size > (Py_ssize_t)1 << 20) {
        size = (Py_ssize_t)1 << 20; /* not ours: a FUSE-sized request for the fallback */
    }
    if ((size_t)size > (size_t)INT_MAX)
        size = INT_MAX & ~511;
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        return NULL;
    char *buf = PyBytes_AS_STRING(out);
    int r;
    const int abi = current_abi;
    Py_BEGIN_ALLOW_THREADS
    r = vc_fuse_call_read(abi, NULL, fh, buf, (size_t)size, (int64_t)off);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        Py_DECREF(out);
        return set_errno_error(r);
    }
    if (r < size && _PyBytes_Resize(&out, r) != 0)
        return NULL;
    return out;
}

static PyObject *mod_handle_write(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *fh_obj;
    Py_buffer view;
    long long off;
    if (!PyArg_ParseTuple(args, "Oy*L:handle_write", &fh_obj, &view, &off))
        return NULL;
    uint64_t fh;
    if (fh_arg(fh_obj, &fh) != 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int r;
    const int abi = current_abi;
    const char *buf = view.buf;
    const size_t len = (size_t)view.len;
    Py_BEGIN_ALLOW_THREADS
    r = vc_fuse_call_write(abi, NULL, fh, buf, len, (int64_t)off);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (r < 0)
        return set_errno_error(r);
    return PyLong_FromLong(r);
}

static PyObject *mod_stats(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    struct vc_stats s;
    vc_stats_get(&s);
    return Py_BuildValue("{sKsKsKsKsKsKsK}", "reads", (unsigned long long)s.reads, "writes",
                         (unsigned long long)s.writes, "fallback_reads", (unsigned long long)s.fallback_reads,
                         "fallback_writes", (unsigned long long)s.fallback_writes, "faults",
                         (unsigned long long)s.faults, "short_writes", (unsigned long long)s.short_writes,
                         "split_requests", (unsigned long long)s.split_requests);
}

static PyObject *mod_openssl_version(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyUnicode_FromString(vc_xts_openssl_version());
}

/* split_cipher(below, above, boundary_sector): FORMAT.md 7.8's key of a file in flight. */
static PyObject *mod_split_cipher(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *below, *above;
    unsigned long long boundary;
    if (!PyArg_ParseTuple(args, "OOK:split_cipher", &below, &above, &boundary))
        return NULL;
    PyObject *parts[2] = {below, above};
    for (int i = 0; i < 2; i++) {
        if (parts[i] != Py_None && !PyObject_TypeCheck(parts[i], &SectorCipher_Type)) {
            PyErr_SetString(PyExc_TypeError, "below and above must be SectorCipher or None");
            return NULL;
        }
    }
    vc_xts *x = NULL;
    const int rc = vc_xts_split_new(below == Py_None ? NULL : ((SectorCipherObject *)below)->x,
                                    above == Py_None ? NULL : ((SectorCipherObject *)above)->x,
                                    (uint64_t)boundary, &x);
    if (rc != 0)
        return set_errno_error(rc);
    SectorCipherObject *self = (SectorCipherObject *)SectorCipher_Type.tp_alloc(&SectorCipher_Type, 0);
    if (self == NULL) {
        vc_xts_unref(x);
        return NULL;
    }
    self->x = x;
    return (PyObject *)self;
}

static PyMethodDef module_methods[] = {
    {"split_cipher", mod_split_cipher, METH_VARARGS,
     "split_cipher(below, above, boundary_sector) -> SectorCipher\n\nSectors below boundary_sector under below, "
     "the rest under above; None: plaintext (copied). The key of a file mid-way through an in-place "
     "re-encryption (docs/FORMAT.md 7.8)."},
    {"register", mod_register, METH_VARARGS,
     "register(fh, fd, state)\n\nServe FUSE handle fh natively: a duplicate of fd with the FileState. "
     "ValueError if fh is registered; OSError if fd cannot be duplicated."},
    {"unregister", mod_unregister, METH_O, "unregister(fh)\n\nStop serving fh natively. KeyError if not registered."},
    {"install", (PyCFunction)(void (*)(void))mod_install, METH_VARARGS | METH_KEYWORDS,
     "install(fallback_read_addr, fallback_write_addr, *, fuse_major=3) -> (native_read_addr, native_write_addr)\n\n"
     "Set the functions unregistered handles go to (addresses of fuse_operations read/write entries; 0 or "
     "None: none, such handles get EBADF) and return the native entries of that libfuse ABI."},
    {"set_log", mod_set_log, METH_O,
     "set_log(callable | None)\n\ncallable(message) is called (with the GIL) for each data fault; None: stderr."},
    {"handle_read", mod_handle_read, METH_VARARGS,
     "handle_read(fh, size, off) -> bytes\n\nThe FUSE read entry on fh, without FUSE. OSError(errno) on failure."},
    {"handle_write", mod_handle_write, METH_VARARGS,
     "handle_write(fh, data, off) -> int\n\nThe FUSE write entry on fh, without FUSE: the count acknowledged "
     "(may be short). OSError(errno) on failure."},
    {"stats", mod_stats, METH_NOARGS, "stats() -> dict of counters (reads, writes, fallback_reads, ...)"},
    {"openssl_version", mod_openssl_version, METH_NOARGS, "The libcrypto version string in use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vmfs_crypt._native",
    .m_doc = "Native data path of vmfs-crypt: XTS sector cipher over libcrypto and FUSE read/write entries.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void);

PyMODINIT_FUNC PyInit__native(void)
{
    if (vc_xts_selftest() != 0) {
        PyErr_SetString(PyExc_ImportError, "vmfs_crypt._native: XTS known-answer self-test failed");
        return NULL;
    }
    if (PyType_Ready(&SectorCipher_Type) < 0 || PyType_Ready(&FileState_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    const int fv = vc_fuse_header_version();
    PyObject *headers = Py_BuildValue("(ii)", fv / 100, fv % 100);
    if (headers == NULL || PyModule_AddType(m, &SectorCipher_Type) < 0 ||
        PyModule_AddType(m, &FileState_Type) < 0 ||
        PyModule_AddIntConstant(m, "SECTOR_SIZE", VC_SECTOR_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "DEK_SIZE", VC_DEK_SIZE) < 0 || PyModule_AddObjectRef(m, "FUSE_HEADERS", headers) < 0) {
        Py_XDECREF(headers);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(headers);
    return m;
}

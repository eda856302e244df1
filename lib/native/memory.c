/*
 * Guest memory: mappings as ArrayBuffers (detached, then unmapped), the SIGBUS handler that
 * survives a file shrunk under a mapping, seals, hole punching, memfd, ftruncate and fstat.
 */
#include "vb.h"

/* ---- shared memory -------------------------------------------------------------------------- */

/*
 * Guest memory is a file the front-end shares with us, and the front-end can shrink that file
 * at any time; touching a page past the new end raises SIGBUS, which would end the process for
 * every VM. Two defences (docs/vhost-user.md, "What a front-end can do to the daemon"):
 * - The caller refuses memfds not sealed against shrinking (fileSeals): QEMU seals by default.
 * - For files that cannot be sealed (hugetlbfs or tmpfs files of memory-backend-file), the
 *   SIGBUS handler below: a fault inside one of our mappings replaces the rest of that mapping
 *   with private zero pages (MAP_FIXED anonymous) and returns, so the faulting access -- from C
 *   or from JIT-compiled JavaScript through a DataView -- is retried and reads zeros. The
 *   mapping is marked faulted (mappingFaulted) so the session can drop that front-end.
 * Faults outside our mappings, and machine-check errors, go to the previous handler (or the
 * default action: the process dies as it would have).
 */
typedef struct vb_mapping {
  void *addr;
  size_t length;
  int prot;
  bool unmapped;
  atomic_bool faulted;
  struct vb_mapping *prev, *next;
} vb_mapping;

/* Live mappings, so that munmap(buffer) and the SIGBUS handler can find them. */
static vb_mapping *vb_mappings = NULL;
static size_t vb_mapping_count = 0;
static atomic_uint_fast64_t vb_mapping_faults = 0;
static struct sigaction vb_sigbus_previous;
static bool vb_sigbus_installed = false;

static void vb_sigbus_handler(int sig, siginfo_t *si, void *uctx) {
  if (si->si_code == BUS_ADRERR) {
    uintptr_t at = (uintptr_t)si->si_addr;
    for (vb_mapping *m = vb_mappings; m != NULL; m = m->next) {
      uintptr_t start = (uintptr_t)m->addr;
      if (m->unmapped || at < start || at >= start + m->length) continue;
      uintptr_t page = at & ~(uintptr_t)4095;
      /* mmap is a plain system call (not on the async-signal-safe list, but it takes no user
       * space lock); the rest of the mapping lies past the file's new end as well. */
      void *r = mmap((void *)page, start + m->length - page, m->prot,
                     MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (r == MAP_FAILED) break;
      atomic_store(&m->faulted, true);
      atomic_fetch_add(&vb_mapping_faults, 1);
      return;
    }
  }
  /* Not ours: hand over as if we had never been installed. */
  if (vb_sigbus_previous.sa_flags & SA_SIGINFO) {
    vb_sigbus_previous.sa_sigaction(sig, si, uctx);
    return;
  }
  if (vb_sigbus_previous.sa_handler != SIG_DFL && vb_sigbus_previous.sa_handler != SIG_IGN) {
    vb_sigbus_previous.sa_handler(sig);
    return;
  }
  /* Default action: restore it and return, so the faulting access faults again and kills. */
  sigaction(SIGBUS, &vb_sigbus_previous, NULL);
}

static void vb_sigbus_install(void) {
  if (vb_sigbus_installed) return;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = vb_sigbus_handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  if (sigaction(SIGBUS, &sa, &vb_sigbus_previous) == 0) vb_sigbus_installed = true;
}

static void vb_mapping_unlink(vb_mapping *m) {
  if (m->prev) m->prev->next = m->next;
  else vb_mappings = m->next;
  if (m->next) m->next->prev = m->prev;
  vb_mapping_count--;
}

/* Runs on the JS thread when the ArrayBuffer is collected (never during detach). */
static void vb_mapping_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  vb_mapping *m = (vb_mapping *)data;
  if (!m->unmapped) munmap(m->addr, m->length);
  vb_mapping_unlink(m);
  free(m);
}

/* unaccounted.cc: an ArrayBuffer over `data` that V8 does not count as external memory. */
napi_status vb_create_unaccounted_arraybuffer(napi_env env, void *data, size_t length,
                                              napi_value *result);

/*
 * mmap(fd, length, offset, writable = true) -> ArrayBuffer over a MAP_SHARED mapping.
 *
 * The buffer is not counted as V8 external memory (see unaccounted.cc: counting it started a
 * garbage collection per 1 GiB window). Its mapping is ours: munmap() detaches and unmaps it;
 * a buffer collected without munmap() is unmapped by the finalizer added here.
 */
napi_value vb_mmap(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int32_t fd;
  int64_t length, offset;
  bool writable = true;
  if (!vb_get_args(env, info, 4, argv) || !vb_int32(env, argv[0], &fd, "fd") ||
      !vb_int64(env, argv[1], &length, "length") || !vb_int64(env, argv[2], &offset, "offset"))
    return NULL;
  napi_valuetype t;
  napi_typeof(env, argv[3], &t);
  if (t == napi_boolean) napi_get_value_bool(env, argv[3], &writable);
  if (length == 0 || length > VB_MAX_MAPPING) return vb_throw_errno(env, EINVAL, "mmap");
  vb_sigbus_install();
  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  void *addr = mmap(NULL, (size_t)length, prot, MAP_SHARED | MAP_NORESERVE, fd, (off_t)offset);
  if (addr == MAP_FAILED) return vb_throw_errno(env, errno, "mmap");
  vb_mapping *m = calloc(1, sizeof *m);
  if (m == NULL) {
    munmap(addr, (size_t)length);
    return vb_throw_errno(env, ENOMEM, "mmap");
  }
  m->addr = addr;
  m->length = (size_t)length;
  m->prot = prot;
  atomic_init(&m->faulted, false);
  napi_value buffer;
  if (vb_create_unaccounted_arraybuffer(env, addr, (size_t)length, &buffer) != napi_ok) {
    munmap(addr, (size_t)length);
    free(m);
    return vb_throw_errno(env, ENOMEM, "mmap");
  }
  if (napi_add_finalizer(env, buffer, m, vb_mapping_finalize, NULL, NULL) != napi_ok) {
    /* Detach so that nothing can reach the memory, then release it. */
    napi_detach_arraybuffer(env, buffer);
    munmap(addr, (size_t)length);
    free(m);
    vb_throw_napi(env, "napi_add_finalizer");
    return NULL;
  }
  m->next = vb_mappings;
  if (vb_mappings) vb_mappings->prev = m;
  vb_mappings = m;
  vb_mapping_count++;
  return buffer;
}

/* munmap(buffer): detaches the ArrayBuffer, then unmaps, so every view over it reads as
 * length 0 / throws instead of touching unmapped memory. */
napi_value vb_munmap(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!vb_get_args(env, info, 1, argv)) return NULL;
  vb_mapping *m = NULL;
  bool is_ab = false;
  napi_is_arraybuffer(env, argv[0], &is_ab);
  if (!is_ab) return vb_throw_type(env, "buffer must be an ArrayBuffer from mmap()");
  void *data = NULL;
  size_t len = 0;
  NAPI_CALL(env, napi_get_arraybuffer_info(env, argv[0], &data, &len));
  m = vb_mappings;
  while (m != NULL && !(m->addr == data && !m->unmapped)) m = m->next;
  if (m == NULL) return vb_throw_errno(env, EINVAL, "munmap");
  /* Detach first: if detaching failed after the unmap, views over the buffer would still point
   * at unmapped memory (a crash on the next access, or another mapping's data). */
  NAPI_CALL(env, napi_detach_arraybuffer(env, argv[0]));
  if (munmap(m->addr, m->length) < 0) return vb_throw_errno(env, errno, "munmap");
  m->unmapped = true;
  return NULL;
}

static vb_mapping *vb_find_mapping(napi_env env, napi_value v) {
  bool is_ab = false;
  napi_is_arraybuffer(env, v, &is_ab);
  if (!is_ab) {
    vb_throw_type(env, "buffer must be an ArrayBuffer from mmap()");
    return NULL;
  }
  void *data = NULL;
  size_t len = 0;
  if (napi_get_arraybuffer_info(env, v, &data, &len) != napi_ok) {
    vb_throw_napi(env, "napi_get_arraybuffer_info");
    return NULL;
  }
  vb_mapping *m = vb_mappings;
  while (m != NULL && !(m->addr == data && !m->unmapped)) m = m->next;
  if (m == NULL) vb_throw_errno(env, EINVAL, "mappingFaulted");
  return m;
}

/* mappingFaulted(buffer) -> true if the file behind the mapping shrank under it (SIGBUS) and
 * part of it now reads as zeros (see vb_sigbus_handler). */
napi_value vb_mapping_faulted(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!vb_get_args(env, info, 1, argv)) return NULL;
  vb_mapping *m = vb_find_mapping(env, argv[0]);
  if (m == NULL) return NULL;
  napi_value out;
  napi_get_boolean(env, atomic_load(&m->faulted), &out);
  return out;
}

/* mappingFaults() -> SIGBUS faults survived since the process started. */
napi_value vb_mapping_faults_fn(napi_env env, napi_callback_info info) {
  (void)info;
  return vb_int(env, (int64_t)atomic_load(&vb_mapping_faults));
}

/* mappingCount() -> live (not yet unmapped) mappings, for leak checks in tests. */
napi_value vb_mapping_count_fn(napi_env env, napi_callback_info info) {
  (void)info;
  size_t live = 0;
  for (vb_mapping *m = vb_mappings; m != NULL; m = m->next)
    if (!m->unmapped) live++;
  return vb_int(env, (int64_t)live);
}

/* fileSeals(fd) -> the memfd's seals (F_SEAL_* bits), or null for a file that has no seals
 * (not a memfd: F_GET_SEALS fails with EINVAL). */
napi_value vb_file_seals(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    if (errno == EINVAL) return vb_null(env);
    return vb_throw_errno(env, errno, "fcntl");
  }
  return vb_int(env, seals);
}

/* addSeals(fd, seals): F_ADD_SEALS (what QEMU does to its guest memfds). */
napi_value vb_add_seals(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd, seals;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &fd, "fd") ||
      !vb_int32(env, argv[1], &seals, "seals"))
    return NULL;
  if (fcntl(fd, F_ADD_SEALS, seals) < 0) return vb_throw_errno(env, errno, "fcntl");
  return NULL;
}

/* punchHole(fd, offset, length): give the pages back to the host, keep the file size. */
napi_value vb_punch_hole(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd;
  int64_t offset, length;
  if (!vb_get_args(env, info, 3, argv) || !vb_int32(env, argv[0], &fd, "fd") ||
      !vb_int64(env, argv[1], &offset, "offset") || !vb_int64(env, argv[2], &length, "length"))
    return NULL;
  int rc;
  do {
    rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return vb_throw_errno(env, errno, "fallocate");
  return NULL;
}

/* memfdCreate(name, hugetlb = false) -> fd (close-on-exec, sealing allowed). */
napi_value vb_memfd_create(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!vb_get_args(env, info, 2, argv)) return NULL;
  char name[250];
  size_t len;
  if (napi_get_value_string_utf8(env, argv[0], name, sizeof name, &len) != napi_ok)
    return vb_throw_type(env, "name must be a string");
  bool huge = false;
  napi_get_value_bool(env, argv[1], &huge);
  int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | (huge ? MFD_HUGETLB : 0));
  if (fd < 0) return vb_throw_errno(env, errno, "memfd_create");
  return vb_int(env, fd);
}

/* ftruncate(fd, size) */
napi_value vb_ftruncate(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd;
  int64_t size;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &fd, "fd") ||
      !vb_int64(env, argv[1], &size, "size"))
    return NULL;
  if (ftruncate(fd, (off_t)size) < 0) return vb_throw_errno(env, errno, "ftruncate");
  return NULL;
}

/* fstat(fd) -> { size, allocatedBytes, blockSize, fsBlockSize, fsType, dev, ino, nonBlocking } */
napi_value vb_fstat(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  struct stat st;
  if (fstat(fd, &st) < 0) return vb_throw_errno(env, errno, "fstat");
  struct statfs sfs;
  if (fstatfs(fd, &sfs) < 0) return vb_throw_errno(env, errno, "fstatfs");
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) return vb_throw_errno(env, errno, "fcntl");
  napi_value out, nb;
  NAPI_CALL(env, napi_create_object(env, &out));
  napi_set_named_property(env, out, "size", vb_int(env, st.st_size));
  napi_set_named_property(env, out, "allocatedBytes", vb_int(env, (int64_t)st.st_blocks * 512));
  napi_set_named_property(env, out, "blockSize", vb_int(env, st.st_blksize));
  napi_set_named_property(env, out, "fsBlockSize", vb_int(env, sfs.f_bsize));
  napi_set_named_property(env, out, "fsType", vb_int(env, (int64_t)(uint32_t)sfs.f_type));
  napi_set_named_property(env, out, "dev", vb_int(env, (int64_t)st.st_dev));
  napi_set_named_property(env, out, "ino", vb_int(env, (int64_t)st.st_ino));
  napi_get_boolean(env, (fl & O_NONBLOCK) != 0, &nb);
  napi_set_named_property(env, out, "nonBlocking", nb);
  return out;
}

/* close(fd) */

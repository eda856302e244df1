/*
 * vballoon native addon: the syscalls Node.js cannot make by itself.
 *
 * Unix stream sockets with SCM_RIGHTS, readiness watching of any fd from the Node event loop
 * (uv_poll, no busy polling and no threadpool), eventfd, mmap/munmap of shared guest memory as
 * detachable ArrayBuffers, fallocate(PUNCH_HOLE) (also on a worker thread per punch queue), memfd_create, ftruncate, fstat, socketpair.
 *
 * This file must not contain protocol logic: it moves bytes and descriptors and reports errno.
 * Every failing syscall throws a JS Error with `code` (e.g. "EBADF"), `errno` (negative, as in
 * Node's own errors) and `syscall`. No path leaks a file descriptor: descriptors received with a
 * truncated control message, or created before a later step fails, are closed here.
 */
#include "vb.h"

#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

napi_value vb_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  /* Linux releases the descriptor even when close reports EINTR: never retry. */
  if (close(fd) < 0 && errno != EINTR) return vb_throw_errno(env, errno, "close");
  return NULL;
}

/* peerCred(fd) -> { pid, uid, gid } of the process at the other end of a unix socket. */
napi_value vb_peer_cred(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return vb_throw_errno(env, errno, "getsockopt");
  napi_value out;
  NAPI_CALL(env, napi_create_object(env, &out));
  napi_set_named_property(env, out, "pid", vb_int(env, cred.pid));
  napi_set_named_property(env, out, "uid", vb_int(env, cred.uid));
  napi_set_named_property(env, out, "gid", vb_int(env, cred.gid));
  return out;
}

/* dup(fd) -> a new close-on-exec descriptor for the same open file. */
napi_value vb_dup(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return vb_throw_errno(env, errno, "fcntl");
  return vb_int(env, copy);
}

/* sameFile(a, b) -> true if both descriptors refer to the same open file description (kcmp
 * KCMP_FILE): what systemd's fd store keeps only once. Falls back to comparing device and inode
 * where kcmp is unavailable (not for anonymous inodes, which all share one). */
napi_value vb_same_file(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t a, b;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &a, "a") || !vb_int32(env, argv[1], &b, "b"))
    return NULL;
  pid_t self = getpid();
  long r = syscall(SYS_kcmp, self, self, 0 /* KCMP_FILE */, (unsigned long)a, (unsigned long)b);
  bool same;
  if (r >= 0) {
    same = r == 0;
  } else if (errno == EBADF) {
    return vb_throw_errno(env, errno, "kcmp");
  } else {
    struct stat sa, sb;
    if (fstat(a, &sa) < 0 || fstat(b, &sb) < 0) return vb_throw_errno(env, errno, "fstat");
    char link[64], target[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", a);
    ssize_t n = readlink(link, target, sizeof target - 1);
    bool anon = n > 11 && strncmp(target, "anon_inode:", 11) == 0;
    same = !anon && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
  }
  napi_value out;
  NAPI_CALL(env, napi_get_boolean(env, same, &out));
  return out;
}

/* checksum(data: Uint8Array, offset, length) -> a 48-bit hash of those bytes (an integer a JS
 * number holds exactly). What tells a whole record of the restart state from one a SIGKILL cut
 * short: it must catch a torn write, not resist an adversary (the memfd is the daemon's own).
 * Eight bytes a round, each word scrambled by multiply-rotate-multiply into a running state,
 * the tail packed into one last word, the length folded in, then a final avalanche. */
static inline uint64_t vb_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

napi_value vb_checksum(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t offset, length;
  if (!vb_get_args(env, info, 3, argv) || !vb_int64(env, argv[1], &offset, "offset") ||
      !vb_int64(env, argv[2], &length, "length"))
    return NULL;
  uint8_t *base;
  size_t size;
  if (!vb_uint8_array(env, argv[0], &base, &size, "data")) return NULL;
  if (offset < 0 || length < 0 || (uint64_t)offset + (uint64_t)length > size)
    return vb_throw_errno(env, ERANGE, "checksum");
  const uint8_t *p = base + offset;
  const uint64_t k1 = 0x9e3779b97f4a7c15ULL, k2 = 0xc2b2ae3d27d4eb4fULL;
  uint64_t h = 0x243f6a8885a308d3ULL ^ ((uint64_t)length * k2);
  size_t n = (size_t)length, i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    h ^= vb_rotl64(w * k1, 31) * k2;
    h = vb_rotl64(h, 27) * 5 + 0x52dce729;
  }
  uint64_t tail = 0;
  for (size_t j = 0; i + j < n; j++) tail |= (uint64_t)p[i + j] << (8 * j);
  h ^= vb_rotl64(tail * k1, 31) * k2;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  napi_value out;
  NAPI_CALL(env, napi_create_double(env, (double)(h & ((1ULL << 48) - 1)), &out));
  return out;
}

/* fence(): a full memory barrier, for the virtqueue's "mb" points. */
napi_value vb_fence(napi_env env, napi_callback_info info) {
  (void)env;
  (void)info;
  atomic_thread_fence(memory_order_seq_cst);
  return NULL;
}


static napi_value vb_init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"listen", NULL, vb_listen, NULL, NULL, NULL, napi_enumerable, NULL},
      {"accept", NULL, vb_accept, NULL, NULL, NULL, napi_enumerable, NULL},
      {"connect", NULL, vb_connect, NULL, NULL, NULL, napi_enumerable, NULL},
      {"socketpair", NULL, vb_socketpair, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pipe", NULL, vb_pipe, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setNonBlocking", NULL, vb_set_nonblocking, NULL, NULL, NULL, napi_enumerable, NULL},
      {"recvmsg", NULL, vb_recvmsg, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sendmsg", NULL, vb_sendmsg, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pollStart", NULL, vb_poll_start, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pollUpdate", NULL, vb_poll_update, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pollStop", NULL, vb_poll_stop, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pollCount", NULL, vb_poll_count, NULL, NULL, NULL, napi_enumerable, NULL},
      {"eventfd", NULL, vb_eventfd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"eventfdRead", NULL, vb_eventfd_read, NULL, NULL, NULL, napi_enumerable, NULL},
      {"eventfdWrite", NULL, vb_eventfd_write, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fdKind", NULL, vb_fd_kind, NULL, NULL, NULL, napi_enumerable, NULL},
      {"mmap", NULL, vb_mmap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"munmap", NULL, vb_munmap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"mappingCount", NULL, vb_mapping_count_fn, NULL, NULL, NULL, napi_enumerable, NULL},
      {"mappingFaulted", NULL, vb_mapping_faulted, NULL, NULL, NULL, napi_enumerable, NULL},
      {"mappingFaults", NULL, vb_mapping_faults_fn, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fileSeals", NULL, vb_file_seals, NULL, NULL, NULL, napi_enumerable, NULL},
      {"addSeals", NULL, vb_add_seals, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHole", NULL, vb_punch_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchQueueCreate", NULL, vb_punch_queue_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchQueueSubmit", NULL, vb_punch_queue_submit, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchQueueWait", NULL, vb_punch_queue_wait, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchQueueClose", NULL, vb_punch_queue_close, NULL, NULL, NULL, napi_enumerable, NULL},
      {"memfdCreate", NULL, vb_memfd_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ftruncate", NULL, vb_ftruncate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fstat", NULL, vb_fstat, NULL, NULL, NULL, napi_enumerable, NULL},
      {"peerCred", NULL, vb_peer_cred, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dup", NULL, vb_dup, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sameFile", NULL, vb_same_file, NULL, NULL, NULL, napi_enumerable, NULL},
      {"close", NULL, vb_close, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fence", NULL, vb_fence, NULL, NULL, NULL, napi_enumerable, NULL},
      {"checksum", NULL, vb_checksum, NULL, NULL, NULL, napi_enumerable, NULL},
      {"notifySend", NULL, vb_notify_send, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dgramListen", NULL, vb_dgram_listen, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dgramRecv", NULL, vb_dgram_recv, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setCloseOnExec", NULL, vb_set_close_on_exec, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) {
    vb_throw_napi(env, "napi_define_properties");
    return NULL;
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, vb_init)

/*
 * vb.h: what the files of the addon share: the includes, limits, the Node-API
 * helpers, and the functions one file defines and another uses. The addon is one module
 * (vballoon.c registers every method); each file holds one job:
 *   napi-util.c  argument checks and Node-style errors
 *   sockets.c    unix sockets with SCM_RIGHTS, pipes
 *   watch.c      fd readiness on the Node event loop (uv_poll), eventfd-aware watches
 *   fd-io.c      reads and writes that never block on a front-end descriptor; eventfd
 *   memory.c     guest memory: mappings, the SIGBUS plan, seals, hole punching, memfd, fstat
 *   notify.c     the service manager's notify datagrams with descriptors (fd store), FD_CLOEXEC
 *   punch.c      hole punching off the event loop: a worker thread per punch queue
 *   vballoon.c   small descriptor calls and the module's registration
 */
#ifndef VB_H
#define VB_H

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <node_api.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>


/* Descriptors accepted in one message. vhost-user sends at most 8; a bigger control buffer lets
 * us receive (and then reject and close) a message that carries more instead of truncating it. */
#define VB_MAX_FDS 32
/* Descriptors the kernel accepts in one SCM_RIGHTS message (SCM_MAX_FD): the fd store and a
 * takeover send bigger sets in batches of this size. */
#define VB_SCM_MAX_FDS 253
/* Largest single read; the framing layer bounds messages far below this. */
#define VB_MAX_READ (256 * 1024)
/* Largest mapping: Node-API external ArrayBuffers are Node Buffers underneath, limited to 4 GiB
 * (buffer.constants.MAX_LENGTH); callers map bigger regions as several windows. */
#define VB_MAX_MAPPING ((int64_t)1 << 32)
/* Longest a read or write on a descriptor from a front-end may block the event loop when the
 * kernel cannot be told "never wait" for that call (eventfd writes): see vb_nowait_io. */
#define VB_IO_GUARD_NS 1000000L
/* pollStart flag (outside libuv's event bits): the fd is an eventfd the watcher reads itself. */
#define VB_POLL_EVENTFD 0x100


#define NAPI_CALL(env, call)                                                                     \
  do {                                                                                           \
    if ((call) != napi_ok) {                                                                     \
      vb_throw_napi(env, #call);                                                                 \
      return NULL;                                                                               \
    }                                                                                            \
  } while (0)

/* Shared between the files: the Node-API helpers and the methods vballoon.c registers. */
bool vb_get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv);
napi_value vb_int(napi_env env, int64_t v);
bool vb_int32(napi_env env, napi_value v, int32_t *out, const char *what);
bool vb_int64(napi_env env, napi_value v, int64_t *out, const char *what);
napi_value vb_null(napi_env env);
napi_value vb_throw_errno(napi_env env, int err, const char *syscall);
void vb_throw_napi(napi_env env, const char *what);
napi_value vb_throw_type(napi_env env, const char *msg);
void vb_make_callback(napi_env env, napi_async_context ctx, napi_value cb, size_t argc, const napi_value *argv);
int vb_fd_list(napi_env env, napi_value value, int *fds, uint32_t max, const char *syscall);
void vb_take_rights(const struct cmsghdr *c, int *fds, size_t *nfds, size_t max);
void vb_close_fds(const int *fds, size_t n);
bool vb_uint8_array(napi_env env, napi_value value, uint8_t **base, size_t *length, const char *what);
void vb_attach_rights(struct msghdr *msg, uint8_t *buf, const int *fds, size_t nfds);
napi_value vb_received(napi_env env, const char *key, napi_value data, const int *fds, size_t nfds, bool truncated,
                       const char *what);
napi_value vb_close_and_throw(napi_env env, int fd, const char *syscall);
socklen_t vb_unix_address(napi_env env, napi_value value, struct sockaddr_un *addr, const char *syscall);
napi_value vb_accept(napi_env env, napi_callback_info info);
napi_value vb_connect(napi_env env, napi_callback_info info);
napi_value vb_listen(napi_env env, napi_callback_info info);
napi_value vb_pipe(napi_env env, napi_callback_info info);
napi_value vb_recvmsg(napi_env env, napi_callback_info info);
napi_value vb_sendmsg(napi_env env, napi_callback_info info);
napi_value vb_set_nonblocking(napi_env env, napi_callback_info info);
napi_value vb_socketpair(napi_env env, napi_callback_info info);
napi_value vb_poll_count(napi_env env, napi_callback_info info);
napi_value vb_poll_start(napi_env env, napi_callback_info info);
napi_value vb_poll_stop(napi_env env, napi_callback_info info);
napi_value vb_poll_update(napi_env env, napi_callback_info info);
napi_value vb_eventfd(napi_env env, napi_callback_info info);
napi_value vb_eventfd_read(napi_env env, napi_callback_info info);
int vb_eventfd_take(int fd, uint64_t *value);
napi_value vb_eventfd_write(napi_env env, napi_callback_info info);
napi_value vb_fd_kind(napi_env env, napi_callback_info info);
napi_value vb_add_seals(napi_env env, napi_callback_info info);
napi_value vb_file_seals(napi_env env, napi_callback_info info);
napi_value vb_fstat(napi_env env, napi_callback_info info);
napi_value vb_ftruncate(napi_env env, napi_callback_info info);
napi_value vb_mapping_count_fn(napi_env env, napi_callback_info info);
napi_value vb_mapping_faulted(napi_env env, napi_callback_info info);
napi_value vb_mapping_faults_fn(napi_env env, napi_callback_info info);
napi_value vb_memfd_create(napi_env env, napi_callback_info info);
napi_value vb_mmap(napi_env env, napi_callback_info info);
napi_value vb_munmap(napi_env env, napi_callback_info info);
napi_value vb_punch_hole(napi_env env, napi_callback_info info);
napi_value vb_notify_send(napi_env env, napi_callback_info info);
napi_value vb_dgram_listen(napi_env env, napi_callback_info info);
napi_value vb_dgram_recv(napi_env env, napi_callback_info info);
napi_value vb_set_close_on_exec(napi_env env, napi_callback_info info);
napi_value vb_punch_queue_create(napi_env env, napi_callback_info info);
napi_value vb_punch_queue_submit(napi_env env, napi_callback_info info);
napi_value vb_punch_queue_wait(napi_env env, napi_callback_info info);
napi_value vb_punch_queue_close(napi_env env, napi_callback_info info);


#endif

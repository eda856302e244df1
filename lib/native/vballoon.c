/*
 * vballoon native addon: the syscalls Node.js cannot make by itself.
 *
 * Unix stream sockets with SCM_RIGHTS, readiness watching of any fd from the Node event loop
 * (uv_poll, no busy polling and no threadpool), eventfd, mmap/munmap of shared guest memory as
 * detachable ArrayBuffers, fallocate(PUNCH_HOLE), memfd_create, ftruncate, fstat, socketpair.
 *
 * This file must not contain protocol logic: it moves bytes and descriptors and reports errno.
 * Every failing syscall throws a JS Error with `code` (e.g. "EBADF"), `errno` (negative, as in
 * Node's own errors) and `syscall`. No path leaks a file descriptor: descriptors received with a
 * truncated control message, or created before a later step fails, are closed here.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <node_api.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

/* Descriptors accepted in one message. vhost-user sends at most 8; a bigger control buffer lets
 * us receive (and then reject and close) a message that carries more instead of truncating it. */
#define VB_MAX_FDS 32
/* Largest single read; the framing layer bounds messages far below this. */
#define VB_MAX_READ (256 * 1024)
/* Largest mapping: Node-API external ArrayBuffers are Node Buffers underneath, limited to 4 GiB
 * (buffer.constants.MAX_LENGTH); callers map bigger regions as several windows. */
#define VB_MAX_MAPPING ((int64_t)1 << 32)

#define NAPI_CALL(env, call)                                                                     \
  do {                                                                                           \
    if ((call) != napi_ok) {                                                                     \
      vb_throw_napi(env, #call);                                                                 \
      return NULL;                                                                               \
    }                                                                                            \
  } while (0)

static void vb_throw_napi(napi_env env, const char *what) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (pending) return;
  const napi_extended_error_info *info = NULL;
  napi_get_last_error_info(env, &info);
  char msg[256];
  snprintf(msg, sizeof msg, "vballoon native: %s: %s", what,
           info && info->error_message ? info->error_message : "N-API call failed");
  napi_throw_error(env, "ERR_NATIVE_API", msg);
}

/* Throws an Error shaped like Node's system errors. Always returns NULL for convenience. */
static napi_value vb_throw_errno(napi_env env, int err, const char *syscall) {
  const char *name = uv_err_name(-err);
  char msg[256];
  snprintf(msg, sizeof msg, "%s failed: %s (%s)", syscall, strerror(err), name);
  napi_value code, message, error, errno_value, syscall_value;
  if (napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message) != napi_ok ||
      napi_create_error(env, code, message, &error) != napi_ok ||
      napi_create_int32(env, -err, &errno_value) != napi_ok ||
      napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_value) != napi_ok) {
    vb_throw_napi(env, "create error");
    return NULL;
  }
  napi_set_named_property(env, error, "errno", errno_value);
  napi_set_named_property(env, error, "syscall", syscall_value);
  napi_throw(env, error);
  return NULL;
}

static napi_value vb_throw_type(napi_env env, const char *msg) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

static bool vb_get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    vb_throw_napi(env, "napi_get_cb_info");
    return false;
  }
  for (size_t i = argc; i < want; i++) napi_get_undefined(env, &argv[i]);
  return true;
}

static bool vb_int32(napi_env env, napi_value v, int32_t *out, const char *what) {
  if (napi_get_value_int32(env, v, out) != napi_ok) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be a number", what);
    vb_throw_type(env, msg);
    return false;
  }
  return true;
}

/* Non-negative integer up to 2^53 (file offsets and lengths). */
static bool vb_int64(napi_env env, napi_value v, int64_t *out, const char *what) {
  napi_valuetype t;
  napi_typeof(env, v, &t);
  bool ok = false;
  if (t == napi_number) {
    double d;
    napi_get_value_double(env, v, &d);
    ok = d >= 0 && d <= 9007199254740991.0 && d == (double)(int64_t)d;
    *out = (int64_t)d;
  } else if (t == napi_bigint) {
    bool lossless = false;
    napi_get_value_bigint_int64(env, v, out, &lossless);
    ok = lossless && *out >= 0;
  }
  if (!ok) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be a non-negative safe integer", what);
    vb_throw_type(env, msg);
  }
  return ok;
}

static napi_value vb_int(napi_env env, int64_t v) {
  napi_value out;
  napi_create_int64(env, v, &out);
  return out;
}

static napi_value vb_null(napi_env env) {
  napi_value out;
  napi_get_null(env, &out);
  return out;
}

static bool vb_fill_sockaddr(napi_env env, napi_value path_value, struct sockaddr_un *addr) {
  char path[sizeof addr->sun_path + 1];
  size_t len = 0;
  if (napi_get_value_string_utf8(env, path_value, path, sizeof path, &len) != napi_ok) {
    vb_throw_type(env, "path must be a string");
    return false;
  }
  if (len == 0 || len >= sizeof addr->sun_path) {
    vb_throw_errno(env, ENAMETOOLONG, "bind");
    return false;
  }
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  memcpy(addr->sun_path, path, len);
  return true;
}

/* listen(path, backlog) -> fd. The listening socket is non-blocking (accept never blocks). */
static napi_value vb_listen(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!vb_get_args(env, info, 2, argv)) return NULL;
  struct sockaddr_un addr;
  int32_t backlog;
  if (!vb_fill_sockaddr(env, argv[0], &addr) || !vb_int32(env, argv[1], &backlog, "backlog"))
    return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return vb_throw_errno(env, errno, "socket");
  if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
    int err = errno;
    close(fd);
    return vb_throw_errno(env, err, "bind");
  }
  if (listen(fd, backlog) < 0) {
    int err = errno;
    close(fd);
    return vb_throw_errno(env, err, "listen");
  }
  return vb_int(env, fd);
}

/* accept(fd) -> new fd, or -1 when no connection is pending. */
static napi_value vb_accept(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  for (;;) {
    int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
    if (c >= 0) return vb_int(env, c);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) return vb_int(env, -1);
    return vb_throw_errno(env, errno, "accept4");
  }
}

/* connect(path) -> fd (a blocking connect; on a unix socket it does not wait for the peer). */
static napi_value vb_connect(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!vb_get_args(env, info, 1, argv)) return NULL;
  struct sockaddr_un addr;
  if (!vb_fill_sockaddr(env, argv[0], &addr)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return vb_throw_errno(env, errno, "socket");
  int rc;
  do {
    rc = connect(fd, (struct sockaddr *)&addr, sizeof addr);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    int err = errno;
    close(fd);
    return vb_throw_errno(env, err, "connect");
  }
  return vb_int(env, fd);
}

/* socketpair() -> [fd, fd], unix stream, close-on-exec. */
static napi_value vb_socketpair(napi_env env, napi_callback_info info) {
  (void)info;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
    return vb_throw_errno(env, errno, "socketpair");
  napi_value arr;
  if (napi_create_array_with_length(env, 2, &arr) != napi_ok) {
    close(sv[0]);
    close(sv[1]);
    vb_throw_napi(env, "napi_create_array");
    return NULL;
  }
  napi_set_element(env, arr, 0, vb_int(env, sv[0]));
  napi_set_element(env, arr, 1, vb_int(env, sv[1]));
  return arr;
}

static void vb_close_fds(const int *fds, size_t n) {
  for (size_t i = 0; i < n; i++) close(fds[i]);
}

/*
 * recvmsg(fd, maxBytes) -> { data: Buffer, fds: number[], truncated: boolean } | null
 * null: nothing to read now (EAGAIN). data.length === 0: the peer closed the connection.
 * truncated: the kernel dropped descriptors (MSG_CTRUNC); the ones that did arrive are closed
 * here and fds is empty, so the caller only has to treat the message as broken.
 */
static napi_value vb_recvmsg(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd, max_bytes;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &fd, "fd") ||
      !vb_int32(env, argv[1], &max_bytes, "maxBytes"))
    return NULL;
  if (max_bytes <= 0 || max_bytes > VB_MAX_READ) return vb_throw_errno(env, EINVAL, "recvmsg");
  static uint8_t data[VB_MAX_READ];
  union {
    struct cmsghdr align;
    uint8_t buf[CMSG_SPACE(sizeof(int) * VB_MAX_FDS)];
  } control;
  struct iovec iov = {.iov_base = data, .iov_len = (size_t)max_bytes};
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.buf;
  msg.msg_controllen = sizeof control.buf;
  ssize_t n;
  do {
    n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return vb_null(env);
    return vb_throw_errno(env, errno, "recvmsg");
  }
  int fds[VB_MAX_FDS];
  size_t nfds = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    int *p = (int *)CMSG_DATA(c);
    for (size_t i = 0; i < count; i++) {
      if (nfds < VB_MAX_FDS)
        fds[nfds++] = p[i];
      else
        close(p[i]);
    }
  }
  bool truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
  if (truncated) {
    vb_close_fds(fds, nfds);
    nfds = 0;
  }
  napi_value result, buffer, fd_array, trunc_value;
  if (napi_create_object(env, &result) != napi_ok ||
      napi_create_buffer_copy(env, (size_t)n, data, NULL, &buffer) != napi_ok ||
      napi_create_array_with_length(env, nfds, &fd_array) != napi_ok ||
      napi_get_boolean(env, truncated, &trunc_value) != napi_ok) {
    vb_close_fds(fds, nfds);
    vb_throw_napi(env, "recvmsg result");
    return NULL;
  }
  for (size_t i = 0; i < nfds; i++) napi_set_element(env, fd_array, (uint32_t)i, vb_int(env, fds[i]));
  napi_set_named_property(env, result, "data", buffer);
  napi_set_named_property(env, result, "fds", fd_array);
  napi_set_named_property(env, result, "truncated", trunc_value);
  return result;
}

/* sendmsg(fd, data: Uint8Array, fds?: number[]) -> bytes sent, or -1 when the socket is full.
 * Descriptors go with the first byte; they are not closed (the caller still owns them). */
static napi_value vb_sendmsg(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd;
  if (!vb_get_args(env, info, 3, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  bool is_typed = false;
  napi_is_typedarray(env, argv[1], &is_typed);
  if (!is_typed) return vb_throw_type(env, "data must be a Uint8Array");
  napi_typedarray_type type;
  size_t length, byte_offset;
  void *base;
  napi_value ab;
  NAPI_CALL(env, napi_get_typedarray_info(env, argv[1], &type, &length, &base, &ab, &byte_offset));
  if (type != napi_uint8_array) return vb_throw_type(env, "data must be a Uint8Array");
  int fds[VB_MAX_FDS];
  uint32_t nfds = 0;
  napi_valuetype t;
  napi_typeof(env, argv[2], &t);
  if (t != napi_undefined && t != napi_null) {
    bool is_array = false;
    napi_is_array(env, argv[2], &is_array);
    if (!is_array) return vb_throw_type(env, "fds must be an array");
    NAPI_CALL(env, napi_get_array_length(env, argv[2], &nfds));
    if (nfds > VB_MAX_FDS) return vb_throw_errno(env, EINVAL, "sendmsg");
    for (uint32_t i = 0; i < nfds; i++) {
      napi_value v;
      NAPI_CALL(env, napi_get_element(env, argv[2], i, &v));
      if (!vb_int32(env, v, &fds[i], "fd")) return NULL;
    }
  }
  union {
    struct cmsghdr align;
    uint8_t buf[CMSG_SPACE(sizeof(int) * VB_MAX_FDS)];
  } control;
  struct iovec iov = {.iov_base = base, .iov_len = length};
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (nfds > 0) {
    memset(control.buf, 0, sizeof control.buf);
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  ssize_t n;
  do {
    n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return vb_int(env, -1);
    return vb_throw_errno(env, errno, "sendmsg");
  }
  return vb_int(env, n);
}

/* ---- fd watching ------------------------------------------------------------------------- */

typedef struct {
  uv_poll_t poll;
  napi_env env;
  napi_ref callback;
  napi_async_context async;
  int fd;
  bool stopped;     /* pollStop called: no more callbacks */
  bool closed;      /* uv_close finished */
  bool finalized;   /* the JS handle was collected */
} vb_watch;

static void vb_watch_maybe_free(vb_watch *w) {
  if (w->closed && w->finalized) free(w);
}

static void vb_watch_closed(uv_handle_t *h) {
  vb_watch *w = (vb_watch *)h->data;
  w->closed = true;
  vb_watch_maybe_free(w);
}

static void vb_watch_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  vb_watch *w = (vb_watch *)data;
  w->finalized = true;
  vb_watch_maybe_free(w);
}

static void vb_watch_event(uv_poll_t *p, int status, int events) {
  vb_watch *w = (vb_watch *)p->data;
  if (w->stopped) return;
  napi_env env = w->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv, argv[2], result;
  if (napi_get_reference_value(env, w->callback, &cb) == napi_ok && cb != NULL) {
    napi_get_global(env, &recv);
    napi_create_int32(env, status, &argv[0]);
    napi_create_int32(env, events, &argv[1]);
    /* make_callback (not call_function) so that promise jobs run after the callback. */
    if (napi_make_callback(env, w->async, recv, cb, 2, argv, &result) != napi_ok) {
      bool pending = false;
      napi_is_exception_pending(env, &pending);
      if (pending) {
        napi_value err;
        napi_get_and_clear_last_exception(env, &err);
        napi_fatal_exception(env, err);
      }
    }
  }
  napi_close_handle_scope(env, scope);
}

/* pollStart(fd, events, callback(status, events)) -> handle. events: 1 readable, 2 writable. */
static napi_value vb_poll_start(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd, events;
  if (!vb_get_args(env, info, 3, argv) || !vb_int32(env, argv[0], &fd, "fd") ||
      !vb_int32(env, argv[1], &events, "events"))
    return NULL;
  napi_valuetype t;
  napi_typeof(env, argv[2], &t);
  if (t != napi_function) return vb_throw_type(env, "callback must be a function");
  uv_loop_t *loop;
  NAPI_CALL(env, napi_get_uv_event_loop(env, &loop));
  vb_watch *w = calloc(1, sizeof *w);
  if (w == NULL) return vb_throw_errno(env, ENOMEM, "pollStart");
  w->env = env;
  w->fd = fd;
  int rc = uv_poll_init(loop, &w->poll, fd);
  if (rc != 0) {
    free(w);
    return vb_throw_errno(env, -rc, "uv_poll_init");
  }
  w->poll.data = w;
  napi_value handle, name;
  if (napi_create_reference(env, argv[2], 1, &w->callback) != napi_ok ||
      napi_create_string_utf8(env, "vballoon:fdwatch", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_async_init(env, NULL, name, &w->async) != napi_ok ||
      napi_create_external(env, w, vb_watch_finalize, NULL, &handle) != napi_ok) {
    /* The handle was initialised: close it through libuv; nothing JS-visible refers to it. */
    w->finalized = true;
    uv_close((uv_handle_t *)&w->poll, vb_watch_closed);
    vb_throw_napi(env, "pollStart");
    return NULL;
  }
  rc = uv_poll_start(&w->poll, events & (UV_READABLE | UV_WRITABLE), vb_watch_event);
  if (rc != 0) {
    w->stopped = true;
    napi_delete_reference(env, w->callback);
    napi_async_destroy(env, w->async);
    uv_close((uv_handle_t *)&w->poll, vb_watch_closed);
    return vb_throw_errno(env, -rc, "uv_poll_start");
  }
  return handle;
}

static vb_watch *vb_get_watch(napi_env env, napi_value v) {
  void *data = NULL;
  if (napi_get_value_external(env, v, &data) != napi_ok || data == NULL) {
    vb_throw_type(env, "handle must be a poll handle");
    return NULL;
  }
  return (vb_watch *)data;
}

/* pollUpdate(handle, events): change the events watched (e.g. add writable while output waits). */
static napi_value vb_poll_update(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t events;
  if (!vb_get_args(env, info, 2, argv)) return NULL;
  vb_watch *w = vb_get_watch(env, argv[0]);
  if (w == NULL || !vb_int32(env, argv[1], &events, "events")) return NULL;
  if (w->stopped) return vb_throw_errno(env, EBADF, "uv_poll_start");
  int rc = uv_poll_start(&w->poll, events & (UV_READABLE | UV_WRITABLE), vb_watch_event);
  if (rc != 0) return vb_throw_errno(env, -rc, "uv_poll_start");
  return NULL;
}

/* pollStop(handle): idempotent; call it before closing the fd. */
static napi_value vb_poll_stop(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!vb_get_args(env, info, 1, argv)) return NULL;
  vb_watch *w = vb_get_watch(env, argv[0]);
  if (w == NULL) return NULL;
  if (w->stopped) return NULL;
  w->stopped = true;
  uv_poll_stop(&w->poll);
  napi_delete_reference(env, w->callback);
  napi_async_destroy(env, w->async);
  uv_close((uv_handle_t *)&w->poll, vb_watch_closed);
  return NULL;
}

/* ---- eventfd ------------------------------------------------------------------------------ */

/* eventfd(initial, nonBlocking) -> fd */
static napi_value vb_eventfd(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t initial;
  bool nonblock = true;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &initial, "initial")) return NULL;
  napi_get_value_bool(env, argv[1], &nonblock);
  int fd = eventfd((unsigned)initial, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0));
  if (fd < 0) return vb_throw_errno(env, errno, "eventfd");
  return vb_int(env, fd);
}

/* eventfdRead(fd, mayBlock = true) -> counter as a number (saturated at 2^53), or null when it
 * is zero. A descriptor from a front-end may be in blocking mode: unless the caller knows it is
 * non-blocking (mayBlock false), a zero-timeout poll first makes sure this never blocks. */
static napi_value vb_eventfd_read(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  bool may_block = true;
  napi_valuetype t;
  napi_typeof(env, argv[1], &t);
  if (t == napi_boolean) napi_get_value_bool(env, argv[1], &may_block);
  if (may_block) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int rc;
    do {
      rc = poll(&p, 1, 0);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) return vb_throw_errno(env, errno, "poll");
    if (rc == 0 || (p.revents & POLLIN) == 0) {
      if (p.revents & POLLNVAL) return vb_throw_errno(env, EBADF, "read");
      return vb_null(env);
    }
  }
  uint64_t value;
  ssize_t n;
  do {
    n = read(fd, &value, sizeof value);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return vb_null(env);
    return vb_throw_errno(env, errno, "read");
  }
  if (n != sizeof value) return vb_throw_errno(env, EINVAL, "read");
  if (value > 9007199254740991ULL) value = 9007199254740991ULL;
  napi_value out;
  napi_create_double(env, (double)value, &out);
  return out;
}

/* eventfdWrite(fd, value = 1) -> true, or false if the counter is full (EAGAIN). */
static napi_value vb_eventfd_write(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd;
  int64_t value = 1;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  napi_valuetype t;
  napi_typeof(env, argv[1], &t);
  if (t != napi_undefined && !vb_int64(env, argv[1], &value, "value")) return NULL;
  uint64_t v = (uint64_t)value;
  ssize_t n;
  do {
    n = write(fd, &v, sizeof v);
  } while (n < 0 && errno == EINTR);
  napi_value out;
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      napi_get_boolean(env, false, &out);
      return out;
    }
    return vb_throw_errno(env, errno, "write");
  }
  napi_get_boolean(env, true, &out);
  return out;
}

/* ---- shared memory -------------------------------------------------------------------------- */

typedef struct vb_mapping {
  void *addr;
  size_t length;
  bool unmapped;
  struct vb_mapping *prev, *next;
} vb_mapping;

/* Live mappings, so that munmap(buffer) can find the mapping behind an ArrayBuffer. */
static vb_mapping *vb_mappings = NULL;
static size_t vb_mapping_count = 0;

static void vb_mapping_unlink(vb_mapping *m) {
  if (m->prev) m->prev->next = m->next;
  else vb_mappings = m->next;
  if (m->next) m->next->prev = m->prev;
  vb_mapping_count--;
}

/* Runs on the JS thread when the ArrayBuffer is collected (never during detach). */
static void vb_mapping_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)data;
  vb_mapping *m = (vb_mapping *)hint;
  if (!m->unmapped) munmap(m->addr, m->length);
  vb_mapping_unlink(m);
  free(m);
}

/* mmap(fd, length, offset, writable = true) -> ArrayBuffer over a MAP_SHARED mapping. */
static napi_value vb_mmap(napi_env env, napi_callback_info info) {
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
  void *addr = mmap(NULL, (size_t)length, PROT_READ | (writable ? PROT_WRITE : 0),
                    MAP_SHARED | MAP_NORESERVE, fd, (off_t)offset);
  if (addr == MAP_FAILED) return vb_throw_errno(env, errno, "mmap");
  vb_mapping *m = calloc(1, sizeof *m);
  if (m == NULL) {
    munmap(addr, (size_t)length);
    return vb_throw_errno(env, ENOMEM, "mmap");
  }
  m->addr = addr;
  m->length = (size_t)length;
  m->next = vb_mappings;
  if (vb_mappings) vb_mappings->prev = m;
  vb_mappings = m;
  vb_mapping_count++;
  napi_value buffer;
  if (napi_create_external_arraybuffer(env, addr, (size_t)length, vb_mapping_finalize, m,
                                       &buffer) != napi_ok) {
    /* Node may already have run (or scheduled) the finalizer, which unmaps and frees `m`:
     * touching it here could free it twice. Within VB_MAX_MAPPING this path is not taken. */
    vb_throw_napi(env, "napi_create_external_arraybuffer");
    return NULL;
  }
  return buffer;
}

/* munmap(buffer): unmaps now and detaches the ArrayBuffer, so every view over it reads as
 * length 0 / throws instead of touching unmapped memory. */
static napi_value vb_munmap(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!vb_get_args(env, info, 1, argv)) return NULL;
  bool is_ab = false;
  napi_is_arraybuffer(env, argv[0], &is_ab);
  if (!is_ab) return vb_throw_type(env, "buffer must be an ArrayBuffer from mmap()");
  void *data = NULL;
  size_t len = 0;
  NAPI_CALL(env, napi_get_arraybuffer_info(env, argv[0], &data, &len));
  vb_mapping *m = vb_mappings;
  while (m != NULL && !(m->addr == data && !m->unmapped)) m = m->next;
  if (m == NULL) return vb_throw_errno(env, EINVAL, "munmap");
  if (munmap(m->addr, m->length) < 0) return vb_throw_errno(env, errno, "munmap");
  m->unmapped = true;
  NAPI_CALL(env, napi_detach_arraybuffer(env, argv[0]));
  return NULL;
}

/* mappingCount() -> live (not yet unmapped) mappings, for leak checks in tests. */
static napi_value vb_mapping_count_fn(napi_env env, napi_callback_info info) {
  (void)info;
  size_t live = 0;
  for (vb_mapping *m = vb_mappings; m != NULL; m = m->next)
    if (!m->unmapped) live++;
  return vb_int(env, (int64_t)live);
}

/* punchHole(fd, offset, length): give the pages back to the host, keep the file size. */
static napi_value vb_punch_hole(napi_env env, napi_callback_info info) {
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
static napi_value vb_memfd_create(napi_env env, napi_callback_info info) {
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
static napi_value vb_ftruncate(napi_env env, napi_callback_info info) {
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
static napi_value vb_fstat(napi_env env, napi_callback_info info) {
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
static napi_value vb_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  /* Linux releases the descriptor even when close reports EINTR: never retry. */
  if (close(fd) < 0 && errno != EINTR) return vb_throw_errno(env, errno, "close");
  return NULL;
}

/* peerCred(fd) -> { pid, uid, gid } of the process at the other end of a unix socket. */
static napi_value vb_peer_cred(napi_env env, napi_callback_info info) {
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
static napi_value vb_dup(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return vb_throw_errno(env, errno, "fcntl");
  return vb_int(env, copy);
}

/* fence(): a full memory barrier, for the virtqueue's "mb" points. */
static napi_value vb_fence(napi_env env, napi_callback_info info) {
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
      {"recvmsg", NULL, vb_recvmsg, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sendmsg", NULL, vb_sendmsg, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pollStart", NULL, vb_poll_start, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pollUpdate", NULL, vb_poll_update, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pollStop", NULL, vb_poll_stop, NULL, NULL, NULL, napi_enumerable, NULL},
      {"eventfd", NULL, vb_eventfd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"eventfdRead", NULL, vb_eventfd_read, NULL, NULL, NULL, napi_enumerable, NULL},
      {"eventfdWrite", NULL, vb_eventfd_write, NULL, NULL, NULL, napi_enumerable, NULL},
      {"mmap", NULL, vb_mmap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"munmap", NULL, vb_munmap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"mappingCount", NULL, vb_mapping_count_fn, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHole", NULL, vb_punch_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"memfdCreate", NULL, vb_memfd_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ftruncate", NULL, vb_ftruncate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fstat", NULL, vb_fstat, NULL, NULL, NULL, napi_enumerable, NULL},
      {"peerCred", NULL, vb_peer_cred, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dup", NULL, vb_dup, NULL, NULL, NULL, napi_enumerable, NULL},
      {"close", NULL, vb_close, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fence", NULL, vb_fence, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) {
    vb_throw_napi(env, "napi_define_properties");
    return NULL;
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, vb_init)

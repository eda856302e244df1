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

/* connect(path) -> fd, or -1 when the listener's backlog is full (try again later).
 * Never blocks: a blocking unix connect to a listener whose backlog is full sleeps until the
 * listener accepts, which would stall the whole event loop. A non-blocking unix connect does
 * not go "in progress" (no EINPROGRESS, nothing to poll for): it either connects at once or
 * fails with EAGAIN, so the caller retries the whole connect. The fd is non-blocking. */
static napi_value vb_connect(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!vb_get_args(env, info, 1, argv)) return NULL;
  struct sockaddr_un addr;
  if (!vb_fill_sockaddr(env, argv[0], &addr)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return vb_throw_errno(env, errno, "socket");
  int rc;
  do {
    rc = connect(fd, (struct sockaddr *)&addr, sizeof addr);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    int err = errno;
    close(fd);
    if (err == EAGAIN || err == EWOULDBLOCK) return vb_int(env, -1);
    return vb_throw_errno(env, err, "connect");
  }
  return vb_int(env, fd);
}

/* pipe() -> [readFd, writeFd], blocking, close-on-exec (tests play hostile front-ends with it). */
static napi_value vb_pipe(napi_env env, napi_callback_info info) {
  (void)info;
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) return vb_throw_errno(env, errno, "pipe2");
  napi_value arr;
  if (napi_create_array_with_length(env, 2, &arr) != napi_ok) {
    close(p[0]);
    close(p[1]);
    vb_throw_napi(env, "napi_create_array");
    return NULL;
  }
  napi_set_element(env, arr, 0, vb_int(env, p[0]));
  napi_set_element(env, arr, 1, vb_int(env, p[1]));
  return arr;
}

/* setNonBlocking(fd, on): sets or clears O_NONBLOCK on the open file description (shared with
 * every process holding it: this is what a hostile front-end can do to our descriptors). */
static napi_value vb_set_nonblocking(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd;
  bool on = true;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  napi_get_value_bool(env, argv[1], &on);
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) return vb_throw_errno(env, errno, "fcntl");
  if (fcntl(fd, F_SETFL, on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK)) < 0) return vb_throw_errno(env, errno, "fcntl");
  return NULL;
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

static int vb_eventfd_take(int fd, uint64_t *value);

typedef struct vb_watch {
  uv_poll_t poll;
  napi_env env;
  napi_ref callback;
  napi_async_context async;
  int fd;
  bool eventfd;     /* VB_POLL_EVENTFD: the watcher reads the counter itself */
  bool failed;      /* an error or hangup was reported; libuv no longer watches the fd */
  bool stopped;     /* pollStop called: no more callbacks */
  bool closed;      /* uv_close finished */
  bool finalized;   /* the JS handle was collected */
  struct vb_watch *prev, *next; /* every watch not yet closed, for pollCount() */
} vb_watch;

static vb_watch *vb_watches = NULL;

static void vb_watch_maybe_free(vb_watch *w) {
  if (w->closed && w->finalized) free(w);
}

static void vb_watch_closed(uv_handle_t *h) {
  vb_watch *w = (vb_watch *)h->data;
  if (w->prev) w->prev->next = w->next;
  else if (vb_watches == w) vb_watches = w->next;
  if (w->next) w->next->prev = w->prev;
  w->prev = w->next = NULL;
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

/*
 * An eventfd watcher (VB_POLL_EVENTFD) consumes the counter before calling back, so every
 * callback either resets the readiness or ends the watch: a level-triggered watch can never
 * spin. Anything but a counter -- an error, a hangup (a pipe whose writer is gone, a closed
 * socket: end of file), a failing read (a listening socket) -- stops the watch and is reported
 * once as status < 0 (UV_EOF for a hangup, else -errno), events 0. A spurious wakeup (the
 * front-end, which shares the fd, read the counter first) calls nothing.
 */
static void vb_watch_event(uv_poll_t *p, int status, int events) {
  vb_watch *w = (vb_watch *)p->data;
  if (w->stopped || w->failed) return;
  double count = 0;
  if (w->eventfd) {
    if (status == 0) {
      uint64_t value = 0;
      int rc = vb_eventfd_take(w->fd, &value);
      if (rc == 0) return;
      if (rc < 0) {
        status = errno == EPIPE ? UV_EOF : -errno;
        events = 0;
      } else {
        count = value > 9007199254740991ULL ? 9007199254740991.0 : (double)value;
        events = UV_READABLE;
      }
    }
    if (status < 0) {
      w->failed = true;
      uv_poll_stop(&w->poll);
    }
  }
  napi_env env = w->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv, argv[3], result;
  if (napi_get_reference_value(env, w->callback, &cb) == napi_ok && cb != NULL) {
    napi_get_global(env, &recv);
    napi_create_int32(env, status, &argv[0]);
    napi_create_int32(env, events, &argv[1]);
    napi_create_double(env, count, &argv[2]);
    /* make_callback (not call_function) so that promise jobs run after the callback. */
    if (napi_make_callback(env, w->async, recv, cb, w->eventfd ? 3 : 2, argv, &result) != napi_ok) {
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

/* pollStart(fd, events, callback(status, events[, count])) -> handle. events: 1 readable,
 * 2 writable, or VB_POLL_EVENTFD (0x100): watch an eventfd, read its counter on every wakeup and
 * pass it as `count` (see vb_watch_event). */
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
  w->eventfd = (events & VB_POLL_EVENTFD) != 0;
  if (w->eventfd) events = UV_READABLE;
  int rc = uv_poll_init(loop, &w->poll, fd);
  if (rc != 0) {
    free(w);
    return vb_throw_errno(env, -rc, "uv_poll_init");
  }
  w->poll.data = w;
  w->next = vb_watches;
  if (vb_watches) vb_watches->prev = w;
  vb_watches = w;
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
  /* A failed watch stays stopped: restarting it would report the same hangup forever. */
  if (w->failed) return vb_throw_errno(env, EPIPE, "uv_poll_start");
  if (w->eventfd) events = UV_READABLE;
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

/* ---- I/O on descriptors from a front-end --------------------------------------------------- */

/*
 * A front-end shares the open file description of every descriptor it sends, so it can switch
 * O_NONBLOCK off at any time, and poll() followed by read()/write() leaves it a window to make
 * the call block (drain a pipe, fill an eventfd counter). vb_nowait_io() never waits:
 *
 * 1. preadv2/pwritev2 with RWF_NOWAIT, a per-call flag that ignores the file's O_NONBLOCK.
 *    Linux 6.x honours it for eventfd reads, pipes and sockets: race-free.
 * 2. Where the kernel refuses it (EOPNOTSUPP: eventfd writes, whose f_op has no write_iter),
 *    poll() first and give up when the fd is not ready; then do the call under a one-shot
 *    per-thread timer that interrupts it with a signal (no SA_RESTART) after VB_IO_GUARD_NS.
 *    A front-end that wins the race between poll and write costs the loop 1 ms, no more.
 *
 * Returns bytes transferred, or -1 with errno (EAGAIN: it would have blocked).
 */
static int vb_guard_signal = 0;              /* 0: not chosen yet, -1: none available */
static pthread_once_t vb_guard_once = PTHREAD_ONCE_INIT;
static __thread volatile sig_atomic_t vb_guard_fired;
static __thread bool vb_guard_ready;
static __thread timer_t vb_guard_timer;

static void vb_guard_handler(int sig) {
  (void)sig;
  vb_guard_fired = 1;
}

/* Picks a real-time signal nobody handles (from SIGRTMAX down) and installs the handler. */
static void vb_guard_install(void) {
  vb_guard_signal = -1;
  for (int sig = SIGRTMAX; sig >= SIGRTMIN; sig--) {
    struct sigaction old;
    if (sigaction(sig, NULL, &old) < 0) continue;
    if ((old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL) continue;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = vb_guard_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: the blocked call must return EINTR */
    if (sigaction(sig, &sa, NULL) == 0) {
      vb_guard_signal = sig;
      return;
    }
  }
}

/* The calling thread's guard timer; false if none can be had. */
static bool vb_guard_prepare(void) {
  if (vb_guard_ready) return true;
  pthread_once(&vb_guard_once, vb_guard_install);
  if (vb_guard_signal < 0) return false;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, vb_guard_signal);
  pthread_sigmask(SIG_UNBLOCK, &set, NULL);
  struct sigevent sev;
  memset(&sev, 0, sizeof sev);
  sev.sigev_notify = SIGEV_THREAD_ID;
  sev.sigev_signo = vb_guard_signal;
  sev._sigev_un._tid = gettid();
  if (timer_create(CLOCK_MONOTONIC, &sev, &vb_guard_timer) < 0) return false;
  vb_guard_fired = 0; /* touches the TLS slot before the handler may */
  vb_guard_ready = true;
  return true;
}

static ssize_t vb_nowait_io(int fd, void *buf, size_t len, bool write_it) {
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  ssize_t n;
  do {
    n = write_it ? pwritev2(fd, &iov, 1, -1, RWF_NOWAIT) : preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  if (n >= 0 || errno != EOPNOTSUPP) return n;
  /* The kernel cannot do this call without waiting on our behalf: poll, then guard. */
  struct pollfd p = {.fd = fd, .events = write_it ? POLLOUT : POLLIN};
  int rc;
  do {
    rc = poll(&p, 1, 0);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return -1;
  if (p.revents & POLLNVAL) {
    errno = EBADF;
    return -1;
  }
  if ((p.revents & p.events) == 0) {
    /* Not ready; a hangup or error is for the call itself to report, without waiting. */
    if ((p.revents & (POLLHUP | POLLERR)) == 0) {
      errno = EAGAIN;
      return -1;
    }
  }
  if (!vb_guard_prepare()) {
    /* No timer: only a descriptor in non-blocking mode is safe to touch (racy, but the best
     * left; never reached on Linux, where real-time signals and timers always exist). */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) return -1;
    if ((fl & O_NONBLOCK) == 0) {
      errno = EAGAIN;
      return -1;
    }
    do {
      n = write_it ? write(fd, buf, len) : read(fd, buf, len);
    } while (n < 0 && errno == EINTR);
    return n;
  }
  struct itimerspec arm = {.it_interval = {0, 0}, .it_value = {0, VB_IO_GUARD_NS}};
  struct itimerspec off = {{0, 0}, {0, 0}};
  vb_guard_fired = 0;
  timer_settime(vb_guard_timer, 0, &arm, NULL);
  do {
    n = write_it ? write(fd, buf, len) : read(fd, buf, len);
  } while (n < 0 && errno == EINTR && !vb_guard_fired);
  int err = errno;
  timer_settime(vb_guard_timer, 0, &off, NULL);
  if (n < 0 && err == EINTR) err = EAGAIN; /* the guard fired: it would have blocked */
  errno = err;
  return n;
}

/* pollCount() -> watches libuv is actively polling (a failed or stopped one is not): a busy
 * loop on a dead descriptor is impossible when its watch is not among them. */
static napi_value vb_poll_count(napi_env env, napi_callback_info info) {
  (void)info;
  int64_t n = 0;
  for (vb_watch *w = vb_watches; w != NULL; w = w->next)
    if (!w->stopped && uv_is_active((uv_handle_t *)&w->poll)) n++;
  return vb_int(env, n);
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

/* Reads an eventfd counter without ever waiting. 1: value read, 0: counter was zero (EAGAIN),
 * -1: errno set (EPIPE for end of file: not an eventfd, e.g. a pipe whose writer is gone;
 * EINVAL for any other short read). */
static int vb_eventfd_take(int fd, uint64_t *value) {
  ssize_t n = vb_nowait_io(fd, value, sizeof *value, false);
  if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
  if (n == 0) {
    errno = EPIPE;
    return -1;
  }
  if (n != sizeof *value) {
    errno = EINVAL;
    return -1;
  }
  return 1;
}

/* eventfdRead(fd) -> counter as a number (saturated at 2^53), or null when it is zero. Never
 * blocks, whatever the fd's mode now or later (vb_nowait_io). A second argument is accepted
 * and ignored (it used to skip a poll() for descriptors known to be non-blocking). */
static napi_value vb_eventfd_read(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  uint64_t value;
  int rc = vb_eventfd_take(fd, &value);
  if (rc < 0) return vb_throw_errno(env, errno, "read");
  if (rc == 0) return vb_null(env);
  if (value > 9007199254740991ULL) value = 9007199254740991ULL;
  napi_value out;
  napi_create_double(env, (double)value, &out);
  return out;
}

/* eventfdWrite(fd, value = 1) -> true, or false if it would block (the counter is full, or a
 * pipe given in its place is full). Never blocks, whatever the fd's mode (vb_nowait_io). */
static napi_value vb_eventfd_write(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd;
  int64_t value = 1;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  napi_valuetype t;
  napi_typeof(env, argv[1], &t);
  if (t != napi_undefined && !vb_int64(env, argv[1], &value, "value")) return NULL;
  uint64_t v = (uint64_t)value;
  ssize_t n = vb_nowait_io(fd, &v, sizeof v, true);
  napi_value out;
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      napi_get_boolean(env, false, &out);
      return out;
    }
    return vb_throw_errno(env, errno, "write");
  }
  if (n != sizeof v) return vb_throw_errno(env, EINVAL, "write");
  napi_get_boolean(env, true, &out);
  return out;
}

/* fdKind(fd) -> "eventfd" | "pipe" | "socket" | "file" | "directory" | "char" | "block" |
 * "anon" (another anonymous inode: epoll, timerfd, ...) | "other". For checking what a
 * front-end hands over (vhost-user wants eventfds for kick, call and err). The /proc link is
 * read first: it names anonymous inodes, pipes and sockets without asking their file system
 * (an fstat on a file of a FUSE mount the front-end serves could wait forever). */
static napi_value vb_fd_kind(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  if (fcntl(fd, F_GETFD) < 0) return vb_throw_errno(env, errno, "fcntl");
  const char *kind = NULL;
  char link[64], target[64];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, target, sizeof target - 1);
  if (n > 0) {
    target[n] = 0;
    if (strcmp(target, "anon_inode:[eventfd]") == 0) kind = "eventfd";
    else if (strncmp(target, "anon_inode:", 11) == 0) kind = "anon";
    else if (strncmp(target, "pipe:[", 6) == 0) kind = "pipe";
    else if (strncmp(target, "socket:[", 8) == 0) kind = "socket";
  }
  if (kind == NULL) {
    struct stat st;
    if (fstat(fd, &st) < 0) return vb_throw_errno(env, errno, "fstat");
    kind = S_ISFIFO(st.st_mode)  ? "pipe"
           : S_ISSOCK(st.st_mode) ? "socket"
           : S_ISREG(st.st_mode)  ? "file"
           : S_ISDIR(st.st_mode)  ? "directory"
           : S_ISCHR(st.st_mode)  ? "char"
           : S_ISBLK(st.st_mode)  ? "block"
                                  : "other";
  }
  napi_value out;
  NAPI_CALL(env, napi_create_string_utf8(env, kind, NAPI_AUTO_LENGTH, &out));
  return out;
}

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
static napi_value vb_munmap(napi_env env, napi_callback_info info) {
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
static napi_value vb_mapping_faulted(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!vb_get_args(env, info, 1, argv)) return NULL;
  vb_mapping *m = vb_find_mapping(env, argv[0]);
  if (m == NULL) return NULL;
  napi_value out;
  napi_get_boolean(env, atomic_load(&m->faulted), &out);
  return out;
}

/* mappingFaults() -> SIGBUS faults survived since the process started. */
static napi_value vb_mapping_faults_fn(napi_env env, napi_callback_info info) {
  (void)info;
  return vb_int(env, (int64_t)atomic_load(&vb_mapping_faults));
}

/* mappingCount() -> live (not yet unmapped) mappings, for leak checks in tests. */
static napi_value vb_mapping_count_fn(napi_env env, napi_callback_info info) {
  (void)info;
  size_t live = 0;
  for (vb_mapping *m = vb_mappings; m != NULL; m = m->next)
    if (!m->unmapped) live++;
  return vb_int(env, (int64_t)live);
}

/* fileSeals(fd) -> the memfd's seals (F_SEAL_* bits), or null for a file that has no seals
 * (not a memfd: F_GET_SEALS fails with EINVAL). */
static napi_value vb_file_seals(napi_env env, napi_callback_info info) {
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
static napi_value vb_add_seals(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd, seals;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &fd, "fd") ||
      !vb_int32(env, argv[1], &seals, "seals"))
    return NULL;
  if (fcntl(fd, F_ADD_SEALS, seals) < 0) return vb_throw_errno(env, errno, "fcntl");
  return NULL;
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

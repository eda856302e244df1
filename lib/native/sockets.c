/*
 * Unix sockets with SCM_RIGHTS (listen, accept, a connect that never blocks, recvmsg/sendmsg
 * with MSG_DONTWAIT and MSG_CMSG_CLOEXEC), socketpairs and pipes.
 */
#include "vb.h"

/*
 * Fills `addr` from a path, or an abstract name written "@name", and returns the address length to pass to bind() or
 * sendmsg(), or 0 after throwing. An abstract name has no terminating NUL and its length is
 * exactly offsetof(sun_path) + 1 + strlen(name): names are compared over that length, so a
 * padded length would name a different socket.
 */
socklen_t vb_unix_address(napi_env env, napi_value value, struct sockaddr_un *addr, const char *syscall) {
  char text[sizeof addr->sun_path + 2];
  size_t len = 0;
  if (napi_get_value_string_utf8(env, value, text, sizeof text, &len) != napi_ok) {
    vb_throw_type(env, "address must be a string");
    return 0;
  }
  if (len == 0 || len >= sizeof addr->sun_path || memchr(text, '\0', len) != NULL) {
    vb_throw_errno(env, len == 0 ? EINVAL : ENAMETOOLONG, syscall);
    return 0;
  }
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (text[0] == '@') {
    if (len < 2) {
      vb_throw_errno(env, EINVAL, syscall);
      return 0;
    }
    addr->sun_path[0] = '\0';
    memcpy(addr->sun_path + 1, text + 1, len - 1);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
  }
  memcpy(addr->sun_path, text, len);
  return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
}

/* listen(path, backlog) -> fd. The listening socket is non-blocking (accept never blocks). */
napi_value vb_listen(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!vb_get_args(env, info, 2, argv)) return NULL;
  struct sockaddr_un addr;
  int32_t backlog;
  socklen_t addr_len = vb_unix_address(env, argv[0], &addr, "bind");
  if (addr_len == 0 || !vb_int32(env, argv[1], &backlog, "backlog")) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return vb_throw_errno(env, errno, "socket");
  if (bind(fd, (struct sockaddr *)&addr, addr_len) < 0) {
    return vb_close_and_throw(env, fd, "bind");
  }
  if (listen(fd, backlog) < 0) {
    return vb_close_and_throw(env, fd, "listen");
  }
  return vb_int(env, fd);
}

/* accept(fd) -> new fd, or -1 when no connection is pending. */
napi_value vb_accept(napi_env env, napi_callback_info info) {
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
napi_value vb_connect(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!vb_get_args(env, info, 1, argv)) return NULL;
  struct sockaddr_un addr;
  socklen_t addr_len = vb_unix_address(env, argv[0], &addr, "connect");
  if (addr_len == 0) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return vb_throw_errno(env, errno, "socket");
  int rc;
  do {
    rc = connect(fd, (struct sockaddr *)&addr, addr_len);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    int err = errno;
    close(fd);
    if (err == EAGAIN || err == EWOULDBLOCK) return vb_int(env, -1);
    return vb_throw_errno(env, err, "connect");
  }
  return vb_int(env, fd);
}

/* [fds[0], fds[1]] for JS; on failure both descriptors are closed (they are ours until returned). */
static napi_value vb_fd_pair(napi_env env, const int fds[2]) {
  napi_value arr;
  if (napi_create_array_with_length(env, 2, &arr) != napi_ok) {
    close(fds[0]);
    close(fds[1]);
    vb_throw_napi(env, "napi_create_array");
    return NULL;
  }
  napi_set_element(env, arr, 0, vb_int(env, fds[0]));
  napi_set_element(env, arr, 1, vb_int(env, fds[1]));
  return arr;
}

/* pipe() -> [readFd, writeFd], blocking, close-on-exec (tests play hostile front-ends with it). */
napi_value vb_pipe(napi_env env, napi_callback_info info) {
  (void)info;
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) return vb_throw_errno(env, errno, "pipe2");
  return vb_fd_pair(env, p);
}

/* setNonBlocking(fd, on): sets or clears O_NONBLOCK on the open file description (shared with
 * every process holding it: this is what a hostile front-end can do to our descriptors). */
napi_value vb_set_nonblocking(napi_env env, napi_callback_info info) {
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
napi_value vb_socketpair(napi_env env, napi_callback_info info) {
  (void)info;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
    return vb_throw_errno(env, errno, "socketpair");
  return vb_fd_pair(env, sv);
}

/*
 * recvmsg(fd, maxBytes) -> { data: Buffer, fds: number[], truncated: boolean } | null
 * null: nothing to read now (EAGAIN). data.length === 0: the peer closed the connection.
 * truncated: the kernel dropped descriptors (MSG_CTRUNC); the ones that did arrive are closed
 * here and fds is empty, so the caller only has to treat the message as broken.
 */
napi_value vb_recvmsg(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd, max_bytes;
  size_t argc = 3;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2)
    return vb_throw_errno(env, EINVAL, "recvmsg");
  if (!vb_int32(env, argv[0], &fd, "fd") || !vb_int32(env, argv[1], &max_bytes, "maxBytes")) return NULL;
  if (max_bytes <= 0 || max_bytes > VB_MAX_READ) return vb_throw_errno(env, EINVAL, "recvmsg");
  /* peek: MSG_PEEK, the data stays queued; descriptors come as new duplicates (Linux). */
  bool peek = false;
  if (argc >= 3) {
    napi_valuetype type;
    if (napi_typeof(env, argv[2], &type) == napi_ok && type == napi_boolean) napi_get_value_bool(env, argv[2], &peek);
  }
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
    n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT | (peek ? MSG_PEEK : 0));
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return vb_null(env);
    return vb_throw_errno(env, errno, "recvmsg");
  }
  int fds[VB_MAX_FDS];
  size_t nfds = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) vb_take_rights(c, fds, &nfds, VB_MAX_FDS);
  bool truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
  if (truncated) {
    vb_close_fds(fds, nfds);
    nfds = 0;
  }
  napi_value buffer;
  if (napi_create_buffer_copy(env, (size_t)n, data, NULL, &buffer) != napi_ok) buffer = NULL;
  return vb_received(env, "data", buffer, fds, nfds, truncated, "recvmsg result");
}

/* sendmsg(fd, data: Uint8Array, fds?: number[]) -> bytes sent, or -1 when the socket is full.
 * Descriptors go with the first byte; they are not closed (the caller still owns them). */
napi_value vb_sendmsg(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd;
  if (!vb_get_args(env, info, 3, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  uint8_t *base;
  size_t length;
  if (!vb_uint8_array(env, argv[1], &base, &length, "data")) return NULL;
  int fds[VB_MAX_FDS];
  int nfds = vb_fd_list(env, argv[2], fds, VB_MAX_FDS, "sendmsg");
  if (nfds < 0) return NULL;
  union {
    struct cmsghdr align;
    uint8_t buf[CMSG_SPACE(sizeof(int) * VB_MAX_FDS)];
  } control;
  struct iovec iov = {.iov_base = base, .iov_len = length};
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  vb_attach_rights(&msg, control.buf, fds, (size_t)nfds);
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

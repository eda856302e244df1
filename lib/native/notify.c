/*
 * Datagrams for the service manager's notify protocol (sd_notify(3)) and its file descriptor
 * store: a synchronous send of one KEY=VALUE datagram with descriptors attached (SCM_RIGHTS) to
 * the socket named by $NOTIFY_SOCKET, and the receiving side (a bound datagram socket that
 * reads one datagram with its descriptors and the sender's pid) for a takeover receiver and the
 * test supervisor. Addresses are a path, or an abstract name written with a leading "@".
 * No protocol logic here: lib/daemon/fd-store.ts and lib/testing/fd-supervisor.ts hold it.
 */
#include "vb.h"

#include <stddef.h>

/* Largest datagram dgramRecv reads. systemd reads at most PIPE_BUF (4096) bytes of a notify
 * message; a bigger buffer lets the test supervisor see (and refuse) an oversized one. */
#define VB_DGRAM_MAX_BYTES (64 * 1024)
/* How long a send may wait for room in the manager's receive queue before it fails (EAGAIN):
 * the send is synchronous by design, but it must not hang the event loop forever. */
#define VB_NOTIFY_SEND_TIMEOUT_MS 5000

/*
 * notifySend(address, text, fds?): one datagram, the descriptors as SCM_RIGHTS, on a new
 * blocking socket. Returns once the kernel queued it on the receiver (the descriptors are then
 * the receiver's as well: closing ours afterwards is safe); throws otherwise. The kernel adds
 * our credentials itself when the receiver asked for them (SO_PASSCRED), as systemd does.
 */
napi_value vb_notify_send(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (!vb_get_args(env, info, 3, argv)) return NULL;
  struct sockaddr_un addr;
  socklen_t addr_len = vb_unix_address(env, argv[0], &addr, "sendmsg");
  if (addr_len == 0) return NULL;
  size_t text_len = 0;
  if (napi_get_value_string_utf8(env, argv[1], NULL, 0, &text_len) != napi_ok)
    return vb_throw_type(env, "text must be a string");
  if (text_len > VB_DGRAM_MAX_BYTES) return vb_throw_errno(env, EMSGSIZE, "sendmsg");
  char *text = malloc(text_len + 1);
  if (text == NULL) return vb_throw_errno(env, ENOMEM, "sendmsg");
  napi_get_value_string_utf8(env, argv[1], text, text_len + 1, &text_len);
  int fds[VB_SCM_MAX_FDS];
  int nfds = vb_fd_list(env, argv[2], fds, VB_SCM_MAX_FDS, "sendmsg");
  if (nfds < 0) {
    free(text);
    return NULL;
  }
  int sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (sock < 0) {
    int err = errno;
    free(text);
    return vb_throw_errno(env, err, "socket");
  }
  struct timeval timeout = {.tv_sec = VB_NOTIFY_SEND_TIMEOUT_MS / 1000,
                            .tv_usec = (VB_NOTIFY_SEND_TIMEOUT_MS % 1000) * 1000};
  setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
  union {
    struct cmsghdr align;
    uint8_t buf[CMSG_SPACE(sizeof(int) * VB_SCM_MAX_FDS)];
  } control;
  struct iovec iov = {.iov_base = text, .iov_len = text_len};
  struct msghdr msg = {0};
  msg.msg_name = &addr;
  msg.msg_namelen = addr_len;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  vb_attach_rights(&msg, control.buf, fds, (size_t)nfds);
  ssize_t n;
  do {
    n = sendmsg(sock, &msg, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  int err = errno;
  close(sock);
  free(text);
  if (n < 0) return vb_throw_errno(env, err, "sendmsg");
  if ((size_t)n != text_len) return vb_throw_errno(env, EMSGSIZE, "sendmsg");
  return NULL;
}

/* dgramListen(address, passCred?) -> fd: a bound, non-blocking, close-on-exec datagram socket.
 * passCred (default true) sets SO_PASSCRED so dgramRecv reports each sender's pid. */
napi_value vb_dgram_listen(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!vb_get_args(env, info, 2, argv)) return NULL;
  struct sockaddr_un addr;
  socklen_t addr_len = vb_unix_address(env, argv[0], &addr, "bind");
  if (addr_len == 0) return NULL;
  bool pass_cred = true;
  napi_valuetype t;
  napi_typeof(env, argv[1], &t);
  if (t == napi_boolean) napi_get_value_bool(env, argv[1], &pass_cred);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return vb_throw_errno(env, errno, "socket");
  int one = 1;
  if (pass_cred && setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof one) < 0) {
    return vb_close_and_throw(env, fd, "setsockopt");
  }
  if (bind(fd, (struct sockaddr *)&addr, addr_len) < 0) {
    return vb_close_and_throw(env, fd, "bind");
  }
  return vb_int(env, fd);
}

/*
 * dgramRecv(fd) -> { text, fds, pid?, truncated } | null (nothing queued).
 * Descriptors arrive close-on-exec and belong to the caller. truncated: the datagram or its
 * descriptors did not fit (MSG_TRUNC / MSG_CTRUNC); the descriptors that did arrive are closed
 * here and fds is empty, so the caller only has to drop the message.
 */
napi_value vb_dgram_recv(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (!vb_get_args(env, info, 1, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  static char data[VB_DGRAM_MAX_BYTES];
  union {
    struct cmsghdr align;
    uint8_t buf[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int) * VB_SCM_MAX_FDS)];
  } control;
  struct iovec iov = {.iov_base = data, .iov_len = sizeof data};
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.buf;
  msg.msg_controllen = sizeof control.buf;
  ssize_t n;
  do {
    n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return vb_null(env);
    return vb_throw_errno(env, errno, "recvmsg");
  }
  int fds[VB_SCM_MAX_FDS];
  size_t nfds = 0;
  bool have_pid = false;
  pid_t pid = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET) continue;
    if (c->cmsg_type == SCM_RIGHTS) {
      vb_take_rights(c, fds, &nfds, VB_SCM_MAX_FDS);
    } else if (c->cmsg_type == SCM_CREDENTIALS && c->cmsg_len >= CMSG_LEN(sizeof(struct ucred))) {
      struct ucred cred;
      memcpy(&cred, CMSG_DATA(c), sizeof cred);
      have_pid = cred.pid > 0;
      pid = cred.pid;
    }
  }
  bool truncated = (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) != 0;
  if (truncated) {
    vb_close_fds(fds, nfds);
    nfds = 0;
  }
  napi_value text;
  if (napi_create_string_utf8(env, data, (size_t)n, &text) != napi_ok) text = NULL;
  napi_value result = vb_received(env, "text", text, fds, nfds, truncated, "dgramRecv result");
  if (result != NULL && have_pid) napi_set_named_property(env, result, "pid", vb_int(env, pid));
  return result;
}

/* setCloseOnExec(fd, on): FD_CLOEXEC on or off (descriptors inherited from a service manager
 * arrive without it; they must not leak into our own children). */
napi_value vb_set_close_on_exec(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd;
  if (!vb_get_args(env, info, 2, argv) || !vb_int32(env, argv[0], &fd, "fd")) return NULL;
  bool on = true;
  napi_valuetype t;
  napi_typeof(env, argv[1], &t);
  if (t == napi_boolean) napi_get_value_bool(env, argv[1], &on);
  int flags = fcntl(fd, F_GETFD);
  if (flags < 0) return vb_throw_errno(env, errno, "fcntl");
  int want = on ? (flags | FD_CLOEXEC) : (flags & ~FD_CLOEXEC);
  if (want != flags && fcntl(fd, F_SETFD, want) < 0) return vb_throw_errno(env, errno, "fcntl");
  return NULL;
}

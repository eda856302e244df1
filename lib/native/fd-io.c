/*
 * Reads and writes on descriptors a front-end shares with us, which never block whatever the
 * front-end does to them (RWF_NOWAIT, or a 1 ms guard timer), and the eventfd calls.
 */
#include "vb.h"

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

/* ---- eventfd ------------------------------------------------------------------------------ */

/* eventfd(initial, nonBlocking) -> fd */
napi_value vb_eventfd(napi_env env, napi_callback_info info) {
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
int vb_eventfd_take(int fd, uint64_t *value) {
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
napi_value vb_eventfd_read(napi_env env, napi_callback_info info) {
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
napi_value vb_eventfd_write(napi_env env, napi_callback_info info) {
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
napi_value vb_fd_kind(napi_env env, napi_callback_info info) {
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

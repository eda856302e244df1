/*
 * Watching descriptors on the Node event loop (uv_poll). A watch on an eventfd (POLL_EVENTFD)
 * drains the counter itself before its callback and stops itself on a hangup or error: no spin.
 */
#include "vb.h"

/* ---- fd watching ------------------------------------------------------------------------- */


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
  napi_value cb, argv[3];
  if (napi_get_reference_value(env, w->callback, &cb) == napi_ok && cb != NULL) {
    napi_create_int32(env, status, &argv[0]);
    napi_create_int32(env, events, &argv[1]);
    napi_create_double(env, count, &argv[2]);
    vb_make_callback(env, w->async, cb, w->eventfd ? 3 : 2, argv);
  }
  napi_close_handle_scope(env, scope);
}

/* pollStart(fd, events, callback(status, events[, count])) -> handle. events: 1 readable,
 * 2 writable, or VB_POLL_EVENTFD (0x100): watch an eventfd, read its counter on every wakeup and
 * pass it as `count` (see vb_watch_event). */
napi_value vb_poll_start(napi_env env, napi_callback_info info) {
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
napi_value vb_poll_update(napi_env env, napi_callback_info info) {
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
napi_value vb_poll_stop(napi_env env, napi_callback_info info) {
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

/* pollCount() -> watches libuv is actively polling (a failed or stopped one is not): a busy
 * loop on a dead descriptor is impossible when its watch is not among them. */
napi_value vb_poll_count(napi_env env, napi_callback_info info) {
  (void)info;
  int64_t n = 0;
  for (vb_watch *w = vb_watches; w != NULL; w = w->next)
    if (!w->stopped && uv_is_active((uv_handle_t *)&w->poll)) n++;
  return vb_int(env, n);
}

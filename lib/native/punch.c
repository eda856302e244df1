/*
 * Hole punching off the event loop: a punch queue is one worker thread that takes batches of
 * file ranges and gives them back to the host (fallocate PUNCH_HOLE | KEEP_SIZE), in order.
 * The event loop only submits batches and learns of their completion, through a uv_async handle
 * (an eventfd underneath) that calls the queue's JavaScript callback, or by waiting for a batch
 * synchronously (punchQueueWait) where the device must not go on before the holes exist.
 *
 * One thread per queue (so a queue's order and its waits are its own), but at most
 * vb_punch_slots() of them punch at the same time, process-wide: with many VMs reclaiming at
 * once, punching never takes every CPU from the event loop that answers them all. A queue the
 * event loop is waiting for (punchQueueWait) may punch beyond that bound: the loop's own CPU is
 * idle meanwhile.
 *
 * Must not: punch a descriptor number it does not own (every batch carries its own dup() of the
 * caller's fd, closed by the worker when the batch is done, so a region closed and its number
 * reused meanwhile cannot be hit); keep the process alive when idle (the async handle is
 * referenced only while a batch is in flight); outlive the Node environment (the env cleanup
 * hook stops and joins every worker; a batch in progress finishes first).
 */
#include "vb.h"

#include <sys/resource.h>

/* Doubles per completion record handed to JavaScript: seq, calls, bytes, errors, first errno,
 * nanoseconds spent in fallocate. */
#define VB_PUNCH_RECORD 6
/* Ranges accepted in one batch: a caller bug (not guest input) must not allocate without bound;
 * the device's batches are far smaller (docs/balloon.md). */
#define VB_PUNCH_MAX_RANGES (1 << 22)

typedef struct vb_punch_batch {
  struct vb_punch_batch *next;
  uint64_t seq;
  int fd; /* our own dup(), closed by the worker */
  size_t count;
  int64_t *ranges; /* offset, length pairs */
  int64_t calls, bytes, errors, busy_ns;
  int first_errno;
} vb_punch_batch;

typedef struct vb_punch_queue {
  pthread_mutex_t lock;
  pthread_cond_t work;  /* a batch was submitted, or the queue closes */
  pthread_cond_t done;  /* a batch completed */
  vb_punch_batch *head, *tail;           /* submitted, not started */
  vb_punch_batch *done_head, *done_tail; /* completed, not yet handed to JavaScript */
  uint64_t next_seq;      /* loop thread only */
  uint64_t completed_seq; /* under lock */
  bool closing;           /* under lock: the worker exits */
  pthread_t thread;
  bool thread_started;
  uv_async_t async;
  napi_env env;
  napi_ref callback;
  napi_async_context actx;
  uint64_t inflight; /* loop thread: batches submitted and not yet handed back */
  bool closed;       /* close ran (explicitly, by the finalizer or by the cleanup hook) */
  bool async_closed; /* uv_close finished */
  bool finalized;    /* the JS handle was collected */
  bool hook;         /* the env cleanup hook is registered */
  atomic_bool urgent; /* the event loop waits for this queue (see vb_punch_slot_take) */
} vb_punch_queue;

/* ---- the process-wide bound on threads punching at once ---------------------------------- */

static pthread_mutex_t vb_slot_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t vb_slot_free = PTHREAD_COND_INITIALIZER;
static int vb_slots_used = 0;

/* Threads that may punch at once: one CPU is left to the event loop (at least one slot). */
static int vb_punch_slots(void) {
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  return cpus > 2 ? (int)(cpus - 1) : 1;
}

static void vb_punch_slot_take(vb_punch_queue *q) {
  int slots = vb_punch_slots();
  pthread_mutex_lock(&vb_slot_lock);
  /* Waits while every slot is taken, unless the event loop waits for this very queue. */
  while (vb_slots_used >= slots && !atomic_load(&q->urgent)) pthread_cond_wait(&vb_slot_free, &vb_slot_lock);
  vb_slots_used++;
  pthread_mutex_unlock(&vb_slot_lock);
}

static void vb_punch_slot_give(void) {
  pthread_mutex_lock(&vb_slot_lock);
  vb_slots_used--;
  pthread_cond_broadcast(&vb_slot_free);
  pthread_mutex_unlock(&vb_slot_lock);
}

/* Wakes the threads waiting for a slot, so an urgent one can go. */
static void vb_punch_slot_poke(void) {
  pthread_mutex_lock(&vb_slot_lock);
  pthread_cond_broadcast(&vb_slot_free);
  pthread_mutex_unlock(&vb_slot_lock);
}

static int64_t vb_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void vb_punch_batch_free(vb_punch_batch *b) {
  if (b->fd >= 0) close(b->fd);
  free(b->ranges);
  free(b);
}

static void vb_punch_run(vb_punch_batch *b) {
  int64_t t0 = vb_now_ns();
  for (size_t i = 0; i < b->count; i++) {
    int64_t off = b->ranges[2 * i], len = b->ranges[2 * i + 1];
    int rc;
    do {
      rc = fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
    } while (rc < 0 && errno == EINTR);
    if (rc == 0) {
      b->calls++;
      b->bytes += len;
    } else {
      if (b->errors == 0) b->first_errno = errno;
      b->errors++;
    }
  }
  b->busy_ns = vb_now_ns() - t0;
  close(b->fd);
  b->fd = -1;
}

/* Reclaim never outranks the guests' vCPUs: a daemon run at a raised priority (the shipped unit's
 * Nice=-10, which is for its event loop) punches at the default one. A thread may always lower
 * its own priority; on Linux this call changes the calling thread only. */
static void vb_punch_drop_priority(void) {
  errno = 0;
  int nice = getpriority(PRIO_PROCESS, 0);
  if (errno == 0 && nice < 0) (void)setpriority(PRIO_PROCESS, 0, 0);
}

static void *vb_punch_main(void *arg) {
  vb_punch_queue *q = (vb_punch_queue *)arg;
  vb_punch_drop_priority();
  pthread_mutex_lock(&q->lock);
  for (;;) {
    while (q->head == NULL && !q->closing) pthread_cond_wait(&q->work, &q->lock);
    if (q->closing) break;
    vb_punch_batch *b = q->head;
    q->head = b->next;
    if (q->head == NULL) q->tail = NULL;
    b->next = NULL;
    pthread_mutex_unlock(&q->lock);
    vb_punch_slot_take(q);
    vb_punch_run(b);
    vb_punch_slot_give();
    pthread_mutex_lock(&q->lock);
    if (q->done_tail) q->done_tail->next = b;
    else q->done_head = b;
    q->done_tail = b;
    q->completed_seq = b->seq;
    pthread_cond_broadcast(&q->done);
    /* Thread-safe; the handle is closed only after this thread is joined. */
    uv_async_send(&q->async);
  }
  pthread_mutex_unlock(&q->lock);
  return NULL;
}

/* Takes every completed batch (call with the lock held) and returns them as records. */
static napi_value vb_punch_take_locked(napi_env env, vb_punch_queue *q, uint64_t *taken) {
  size_t n = 0;
  for (vb_punch_batch *b = q->done_head; b != NULL; b = b->next) n++;
  *taken = n;
  napi_value ab, out;
  void *data = NULL;
  if (napi_create_arraybuffer(env, n * VB_PUNCH_RECORD * sizeof(double), &data, &ab) != napi_ok ||
      napi_create_typedarray(env, napi_float64_array, n * VB_PUNCH_RECORD, ab, 0, &out) != napi_ok)
    return NULL;
  double *rec = (double *)data;
  vb_punch_batch *b = q->done_head;
  while (b != NULL) {
    vb_punch_batch *next = b->next;
    rec[0] = (double)b->seq;
    rec[1] = (double)b->calls;
    rec[2] = (double)b->bytes;
    rec[3] = (double)b->errors;
    rec[4] = (double)b->first_errno;
    rec[5] = (double)b->busy_ns;
    rec += VB_PUNCH_RECORD;
    vb_punch_batch_free(b);
    b = next;
  }
  q->done_head = q->done_tail = NULL;
  return out;
}

/* Loop thread: `taken` batches were handed back; idle queues neither keep the loop alive nor
 * keep their callback (and so their owner) from being collected. */
static void vb_punch_settle(vb_punch_queue *q, uint64_t taken) {
  if (taken == 0) return;
  q->inflight -= taken;
  if (q->inflight == 0) {
    uv_unref((uv_handle_t *)&q->async);
    if (!q->closed) napi_reference_unref(q->env, q->callback, NULL);
  }
}

static void vb_punch_async_cb(uv_async_t *h) {
  vb_punch_queue *q = (vb_punch_queue *)h->data;
  if (q->closed) return;
  napi_env env = q->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  pthread_mutex_lock(&q->lock);
  uint64_t taken = 0;
  napi_value records = q->done_head != NULL ? vb_punch_take_locked(env, q, &taken) : NULL;
  pthread_mutex_unlock(&q->lock);
  if (records != NULL) {
    napi_value cb = NULL;
    napi_get_reference_value(env, q->callback, &cb);
    /* Settle first: the callback may submit again (and so take a new reference). */
    vb_punch_settle(q, taken);
    if (cb != NULL) vb_make_callback(env, q->actx, cb, 1, &records);
  }
  napi_close_handle_scope(env, scope);
}

static void vb_punch_maybe_free(vb_punch_queue *q) {
  if (!q->async_closed || !q->finalized) return;
  pthread_mutex_destroy(&q->lock);
  pthread_cond_destroy(&q->work);
  pthread_cond_destroy(&q->done);
  free(q);
}

static void vb_punch_async_closed(uv_handle_t *h) {
  vb_punch_queue *q = (vb_punch_queue *)h->data;
  q->async_closed = true;
  vb_punch_maybe_free(q);
}

static void vb_punch_cleanup_hook(void *arg);

/* Stops the worker after the batch it is punching (batches not started are dropped: their
 * memory simply stays with the file), joins it and releases everything but the struct. */
static void vb_punch_close(vb_punch_queue *q, bool from_hook) {
  if (q->closed) return;
  q->closed = true;
  pthread_mutex_lock(&q->lock);
  q->closing = true;
  vb_punch_batch *b = q->head;
  q->head = q->tail = NULL;
  pthread_cond_broadcast(&q->work);
  pthread_mutex_unlock(&q->lock);
  while (b != NULL) {
    vb_punch_batch *next = b->next;
    vb_punch_batch_free(b);
    b = next;
  }
  /* A batch the worker took may wait for a slot: let it through, the loop waits for it now. */
  atomic_store(&q->urgent, true);
  vb_punch_slot_poke();
  if (q->thread_started) pthread_join(q->thread, NULL);
  b = q->done_head;
  while (b != NULL) {
    vb_punch_batch *next = b->next;
    vb_punch_batch_free(b);
    b = next;
  }
  q->done_head = q->done_tail = NULL;
  if (!from_hook && q->hook) napi_remove_env_cleanup_hook(q->env, vb_punch_cleanup_hook, q);
  q->hook = false;
  if (!from_hook) {
    napi_delete_reference(q->env, q->callback);
    napi_async_destroy(q->env, q->actx);
  }
  uv_close((uv_handle_t *)&q->async, vb_punch_async_closed);
}

static void vb_punch_cleanup_hook(void *arg) {
  vb_punch_close((vb_punch_queue *)arg, true);
}

static void vb_punch_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  vb_punch_queue *q = (vb_punch_queue *)data;
  vb_punch_close(q, false);
  q->finalized = true;
  vb_punch_maybe_free(q);
}

/* punchQueueCreate(callback(records: Float64Array)) -> handle. */
napi_value vb_punch_queue_create(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!vb_get_args(env, info, 1, argv)) return NULL;
  napi_valuetype t;
  napi_typeof(env, argv[0], &t);
  if (t != napi_function) return vb_throw_type(env, "callback must be a function");
  uv_loop_t *loop;
  NAPI_CALL(env, napi_get_uv_event_loop(env, &loop));
  vb_punch_queue *q = calloc(1, sizeof *q);
  if (q == NULL) return vb_throw_errno(env, ENOMEM, "punchQueueCreate");
  q->env = env;
  q->next_seq = 1;
  atomic_init(&q->urgent, false);
  pthread_mutex_init(&q->lock, NULL);
  pthread_cond_init(&q->work, NULL);
  pthread_cond_init(&q->done, NULL);
  int rc = uv_async_init(loop, &q->async, vb_punch_async_cb);
  if (rc != 0) {
    pthread_mutex_destroy(&q->lock);
    pthread_cond_destroy(&q->work);
    pthread_cond_destroy(&q->done);
    free(q);
    return vb_throw_errno(env, -rc, "uv_async_init");
  }
  q->async.data = q;
  uv_unref((uv_handle_t *)&q->async);
  napi_value handle, name;
  /* The callback is held weakly while the queue is idle (see vb_punch_settle). */
  if (napi_create_reference(env, argv[0], 0, &q->callback) != napi_ok ||
      napi_create_string_utf8(env, "vballoon:punch", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_async_init(env, NULL, name, &q->actx) != napi_ok ||
      napi_create_external(env, q, vb_punch_finalize, NULL, &handle) != napi_ok) {
    q->closed = q->finalized = true;
    uv_close((uv_handle_t *)&q->async, vb_punch_async_closed);
    vb_throw_napi(env, "punchQueueCreate");
    return NULL;
  }
  /* The worker must never take a process signal meant for the event loop's thread. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  rc = pthread_create(&q->thread, NULL, vb_punch_main, q);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0) {
    /* The external's finalizer closes the async handle when the handle is collected. */
    return vb_throw_errno(env, rc, "pthread_create");
  }
  q->thread_started = true;
  /* Seen in ps -L, top -H and perf as what it is (best effort: a name is not a function). */
  pthread_setname_np(q->thread, "vb-punch");
  if (napi_add_env_cleanup_hook(env, vb_punch_cleanup_hook, q) == napi_ok) q->hook = true;
  return handle;
}

static vb_punch_queue *vb_get_punch_queue(napi_env env, napi_value v) {
  void *data = NULL;
  if (napi_get_value_external(env, v, &data) != napi_ok || data == NULL) {
    vb_throw_type(env, "handle must be a punch queue");
    return NULL;
  }
  vb_punch_queue *q = (vb_punch_queue *)data;
  if (q->closed || !q->thread_started) {
    vb_throw_errno(env, EBADF, "punchQueue");
    return NULL;
  }
  return q;
}

/* punchQueueSubmit(handle, fd, ranges: Float64Array of offset, length pairs) -> seq. The queue
 * punches them on its thread, after every batch submitted before, on its own dup() of fd. */
napi_value vb_punch_queue_submit(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd;
  if (!vb_get_args(env, info, 3, argv)) return NULL;
  vb_punch_queue *q = vb_get_punch_queue(env, argv[0]);
  if (q == NULL || !vb_int32(env, argv[1], &fd, "fd")) return NULL;
  bool is_ta = false;
  napi_is_typedarray(env, argv[2], &is_ta);
  napi_typedarray_type type;
  size_t length = 0;
  void *data = NULL;
  if (is_ta) NAPI_CALL(env, napi_get_typedarray_info(env, argv[2], &type, &length, &data, NULL, NULL));
  if (!is_ta || type != napi_float64_array || length % 2 != 0)
    return vb_throw_type(env, "ranges must be a Float64Array of offset, length pairs");
  size_t count = length / 2;
  if (count > VB_PUNCH_MAX_RANGES) return vb_throw_errno(env, E2BIG, "punchQueueSubmit");
  const double *src = (const double *)data;
  for (size_t i = 0; i < length; i++)
    if (!(src[i] >= 0 && src[i] <= 9007199254740991.0) || src[i] != (double)(int64_t)src[i])
      return vb_throw_type(env, "ranges must hold non-negative integers");
  vb_punch_batch *b = calloc(1, sizeof *b);
  int64_t *ranges = count > 0 ? malloc(count * 2 * sizeof(int64_t)) : NULL;
  if (b == NULL || (count > 0 && ranges == NULL)) {
    free(b);
    free(ranges);
    return vb_throw_errno(env, ENOMEM, "punchQueueSubmit");
  }
  for (size_t i = 0; i < length; i++) ranges[i] = (int64_t)src[i];
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) {
    int err = errno;
    free(b);
    free(ranges);
    return vb_throw_errno(env, err, "fcntl");
  }
  b->fd = copy;
  b->count = count;
  b->ranges = ranges;
  b->seq = q->next_seq++;
  if (q->inflight++ == 0) {
    uv_ref((uv_handle_t *)&q->async);
    napi_reference_ref(env, q->callback, NULL);
  }
  pthread_mutex_lock(&q->lock);
  if (q->tail) q->tail->next = b;
  else q->head = b;
  q->tail = b;
  pthread_cond_signal(&q->work);
  pthread_mutex_unlock(&q->lock);
  return vb_int(env, (int64_t)b->seq);
}

/* punchQueueWait(handle, seq) -> records: blocks until batch `seq` (and so every batch before
 * it) is punched, then hands back every completed batch's record (which the callback will then
 * not see). For the points where the guest may touch the pages next (docs/balloon.md). */
napi_value vb_punch_queue_wait(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t seq;
  if (!vb_get_args(env, info, 2, argv)) return NULL;
  vb_punch_queue *q = vb_get_punch_queue(env, argv[0]);
  if (q == NULL || !vb_int64(env, argv[1], &seq, "seq")) return NULL;
  if (seq < 0 || (uint64_t)seq >= q->next_seq) return vb_throw_errno(env, EINVAL, "punchQueueWait");
  pthread_mutex_lock(&q->lock);
  if (q->completed_seq < (uint64_t)seq) {
    atomic_store(&q->urgent, true);
    vb_punch_slot_poke();
    while (q->completed_seq < (uint64_t)seq) pthread_cond_wait(&q->done, &q->lock);
    atomic_store(&q->urgent, false);
  }
  uint64_t taken = 0;
  napi_value out = vb_punch_take_locked(env, q, &taken);
  pthread_mutex_unlock(&q->lock);
  if (out == NULL) {
    vb_throw_napi(env, "punchQueueWait");
    return NULL;
  }
  vb_punch_settle(q, taken);
  return out;
}

/* punchQueueClose(handle): drops batches not started, waits for the one in progress, stops the
 * thread. Idempotent. */
napi_value vb_punch_queue_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!vb_get_args(env, info, 1, argv)) return NULL;
  void *data = NULL;
  if (napi_get_value_external(env, argv[0], &data) != napi_ok || data == NULL)
    return vb_throw_type(env, "handle must be a punch queue");
  vb_punch_queue *q = (vb_punch_queue *)data;
  if (!q->closed && q->inflight > 0) {
    q->inflight = 0;
    uv_unref((uv_handle_t *)&q->async);
    napi_reference_unref(env, q->callback, NULL);
  }
  vb_punch_close(q, false);
  return NULL;
}

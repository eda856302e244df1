/*
 * Node-API helpers: argument checks and errors that carry code, errno and syscall.
 */
#include "vb.h"

#include <stdio.h>

void vb_throw_napi(napi_env env, const char *what) {
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
napi_value vb_throw_errno(napi_env env, int err, const char *syscall) {
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

napi_value vb_throw_type(napi_env env, const char *msg) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

bool vb_get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    vb_throw_napi(env, "napi_get_cb_info");
    return false;
  }
  for (size_t i = argc; i < want; i++) napi_get_undefined(env, &argv[i]);
  return true;
}

bool vb_int32(napi_env env, napi_value v, int32_t *out, const char *what) {
  if (napi_get_value_int32(env, v, out) != napi_ok) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be a number", what);
    vb_throw_type(env, msg);
    return false;
  }
  return true;
}

/* Non-negative integer up to 2^53 (file offsets and lengths). */
bool vb_int64(napi_env env, napi_value v, int64_t *out, const char *what) {
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

napi_value vb_int(napi_env env, int64_t v) {
  napi_value out;
  napi_create_int64(env, v, &out);
  return out;
}

napi_value vb_null(napi_env env) {
  napi_value out;
  napi_get_null(env, &out);
  return out;
}

/* Calls `cb` from a libuv callback with make_callback (so promise jobs run after it); an
 * exception it throws becomes Node's uncaught exception, as it would from any event handler. */
void vb_make_callback(napi_env env, napi_async_context ctx, napi_value cb, size_t argc, const napi_value *argv) {
  napi_value recv, result;
  napi_get_global(env, &recv);
  if (napi_make_callback(env, ctx, recv, cb, argc, argv, &result) == napi_ok) return;
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (!pending) return;
  napi_value err;
  napi_get_and_clear_last_exception(env, &err);
  napi_fatal_exception(env, err);
}

/* Reads an optional array (undefined or null: none) of at most `max` descriptors into `fds`;
 * returns how many, or -1 after throwing. */
int vb_fd_list(napi_env env, napi_value value, int *fds, uint32_t max, const char *syscall) {
  napi_valuetype t;
  napi_typeof(env, value, &t);
  if (t == napi_undefined || t == napi_null) return 0;
  bool is_array = false;
  napi_is_array(env, value, &is_array);
  if (!is_array) {
    vb_throw_type(env, "fds must be an array");
    return -1;
  }
  uint32_t n = 0;
  if (napi_get_array_length(env, value, &n) != napi_ok) {
    vb_throw_napi(env, "napi_get_array_length");
    return -1;
  }
  if (n > max) {
    vb_throw_errno(env, EINVAL, syscall);
    return -1;
  }
  for (uint32_t i = 0; i < n; i++) {
    napi_value v;
    if (napi_get_element(env, value, i, &v) != napi_ok) {
      vb_throw_napi(env, "napi_get_element");
      return -1;
    }
    if (!vb_int32(env, v, &fds[i], "fd")) return -1;
  }
  return (int)n;
}

/* Appends the descriptors of one SCM_RIGHTS message to fds (up to max; the rest are closed:
 * they arrived, so they are ours to close). */
void vb_take_rights(const struct cmsghdr *c, int *fds, size_t *nfds, size_t max) {
  size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
  const uint8_t *p = CMSG_DATA(c);
  for (size_t i = 0; i < count; i++) {
    int one;
    memcpy(&one, p + i * sizeof(int), sizeof one);
    if (*nfds < max)
      fds[(*nfds)++] = one;
    else
      close(one);
  }
}

void vb_close_fds(const int *fds, size_t n) {
  for (size_t i = 0; i < n; i++) close(fds[i]);
}

/* The bytes of a Uint8Array argument (any other value throws a TypeError naming `what`). */
bool vb_uint8_array(napi_env env, napi_value value, uint8_t **base, size_t *length, const char *what) {
  bool is_typed = false;
  napi_typedarray_type type = napi_int8_array;
  void *data = NULL;
  if (napi_is_typedarray(env, value, &is_typed) == napi_ok && is_typed &&
      napi_get_typedarray_info(env, value, &type, length, &data, NULL, NULL) == napi_ok &&
      type == napi_uint8_array) {
    *base = (uint8_t *)data;
    return true;
  }
  char msg[96];
  snprintf(msg, sizeof msg, "%s must be a Uint8Array", what);
  vb_throw_type(env, msg);
  return false;
}

/* Attaches `nfds` descriptors to `msg` as one SCM_RIGHTS message written into `buf`, which must
 * hold CMSG_SPACE(sizeof(int) * nfds) bytes; with none, `msg` carries no control data. */
void vb_attach_rights(struct msghdr *msg, uint8_t *buf, const int *fds, size_t nfds) {
  if (nfds == 0) return;
  memset(buf, 0, CMSG_SPACE(sizeof(int) * nfds));
  msg->msg_control = buf;
  msg->msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
  struct cmsghdr *c = CMSG_FIRSTHDR(msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
  memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
}

/* A received message for JavaScript: { [key]: data, fds, truncated }. `data` is NULL when making
 * it failed. On any failure the descriptors are closed and an error is thrown (returns NULL). */
napi_value vb_received(napi_env env, const char *key, napi_value data, const int *fds, size_t nfds, bool truncated,
                       const char *what) {
  napi_value result, fd_array, trunc_value;
  if (data == NULL || napi_create_object(env, &result) != napi_ok ||
      napi_create_array_with_length(env, nfds, &fd_array) != napi_ok ||
      napi_get_boolean(env, truncated, &trunc_value) != napi_ok) {
    vb_close_fds(fds, nfds);
    vb_throw_napi(env, what);
    return NULL;
  }
  for (size_t i = 0; i < nfds; i++) napi_set_element(env, fd_array, (uint32_t)i, vb_int(env, fds[i]));
  napi_set_named_property(env, result, key, data);
  napi_set_named_property(env, result, "fds", fd_array);
  napi_set_named_property(env, result, "truncated", trunc_value);
  return result;
}

/* Closes `fd` after a failed call on it and throws that call's errno (saved before close). */
napi_value vb_close_and_throw(napi_env env, int fd, const char *syscall) {
  int err = errno;
  close(fd);
  return vb_throw_errno(env, err, syscall);
}

/*
 * Node-API helpers: argument checks and errors that carry code, errno and syscall.
 */
#include "vb.h"

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

/*
 * One function Node-API lacks: an ArrayBuffer over memory V8 must not count as external memory.
 *
 * Node-API's external ArrayBuffers count their length against V8's external memory limit, and
 * every 64 MiB over it starts a garbage collection: mapping a 1 TiB guest as 1 GiB windows cost
 * a full GC per window, seconds of stalled event loop for every VM (issue 15). A guest mapping
 * is address space, not memory this process allocated. V8 does not count a backing store whose
 * deleter is BackingStore::EmptyDeleter (BackingStore::PerIsolateAccountingLength), so the
 * buffer is made with the V8 API here, and the mapping's lifetime stays with vballoon.c (munmap
 * after detach, or a finalizer added with napi_add_finalizer if the buffer is collected).
 *
 * This leaves Node-API's ABI stability for this one call: the addon is built by node-gyp for the
 * Node.js it runs on (npm ci), and a napi_value is a v8::Local<v8::Value>'s slot in Node.js.
 * Must not allocate, free or map memory, and must not contain anything but this conversion.
 */
#include <node_api.h>
#include <v8.h>

#include <memory>

extern "C" napi_status vb_create_unaccounted_arraybuffer(napi_env env, void *data, size_t length,
                                                         napi_value *result) {
  (void)env;
  v8::Isolate *isolate = v8::Isolate::GetCurrent();
  if (isolate == nullptr) return napi_generic_failure;
  std::unique_ptr<v8::BackingStore> store =
      v8::ArrayBuffer::NewBackingStore(data, length, v8::BackingStore::EmptyDeleter, nullptr);
  v8::Local<v8::Value> buffer = v8::ArrayBuffer::New(isolate, std::move(store));
  // Node-API's own conversion (v8impl::JsValueFromV8LocalValue): valid in the caller's scope.
  *result = reinterpret_cast<napi_value>(*buffer);
  return napi_ok;
}

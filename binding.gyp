{
  "targets": [
    {
      "target_name": "vballoon",
      "sources": [
        "lib/native/vballoon.c",
        "lib/native/napi-util.c",
        "lib/native/sockets.c",
        "lib/native/watch.c",
        "lib/native/fd-io.c",
        "lib/native/memory.c",
        "lib/native/notify.c",
        "lib/native/punch.c",
        "lib/native/unaccounted.cc"
      ],
      "cflags": ["-Wall", "-Wextra", "-Werror", "-O2"],
      "cflags_c": ["-std=gnu11"],
      "cflags_cc": ["-std=gnu++17"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"]
    }
  ]
}

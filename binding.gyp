{
  "targets": [
    {
      "target_name": "vballoon",
      "sources": ["lib/native/vballoon.c"],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"]
    }
  ]
}

/*
 * A memory eater for the end-to-end guest: allocates MiB chunks, writes every page, and reports
 * progress on stdout. Usage: eater TOTAL_MIB [CHUNK_MIB] [DELAY_MS] [HOLD_S]
 * Exits 0 after holding the memory HOLD_S seconds (then frees it by exiting); killed by the
 * OOM killer otherwise (the harness sees no "EATER DONE" line).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
  long total = argc > 1 ? atol(argv[1]) : 64;
  long chunk = argc > 2 ? atol(argv[2]) : 4;
  long delay_ms = argc > 3 ? atol(argv[3]) : 0;
  long hold_s = argc > 4 ? atol(argv[4]) : 0;
  long got = 0;
  while (got < total) {
    long n = chunk < total - got ? chunk : total - got;
    char *p = malloc((size_t)n << 20);
    if (p == NULL) {
      printf("EATER FAILED at %ld MiB\n", got);
      return 1;
    }
    for (long i = 0; i < (n << 20); i += 4096) p[i] = (char)(i >> 12);
    got += n;
    if (got % 64 == 0 || got == total) {
      printf("EATER %ld MiB\n", got);
      fflush(stdout);
    }
    if (delay_ms > 0) usleep((useconds_t)delay_ms * 1000);
  }
  if (hold_s > 0) sleep((unsigned)hold_s);
  printf("EATER DONE %ld MiB\n", got);
  return 0;
}

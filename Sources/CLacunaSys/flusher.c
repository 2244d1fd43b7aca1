// A thread that keeps the disk busy with an output file's dirty pages while the conversion
// goes on, so that the fsync before the rename finds little left to write. It starts
// writeback of the whole file and waits for it (sync_file_range: data only, no journal
// commit and no device cache flush; the final fsync does those), pauses briefly, and
// repeats until stopped.
#define _GNU_SOURCE 1
#include "CLacunaSys.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

struct lacuna_flusher {
  int fd;
  int stopping;
  int error;  // the first errno sync_file_range gave; writeback errors it reports are
              // consumed for this descriptor, so the final fsync would not see them again
  pthread_mutex_t lock;
  pthread_cond_t wake;
  pthread_t thread;
};

enum { PAUSE_NANOSECONDS = 20 * 1000 * 1000 };

static void *flusher_main(void *argument) {
  struct lacuna_flusher *f = argument;
  const unsigned flags =
      SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
  pthread_mutex_lock(&f->lock);
  while (!f->stopping) {
    pthread_mutex_unlock(&f->lock);
    int result = sync_file_range(f->fd, 0, 0, flags);
    int saved = errno;
    pthread_mutex_lock(&f->lock);
    if (result != 0 && saved != EINTR) {
      // ESPIPE and EINVAL: not a file this works on; anything else is a write error.
      if (saved != ESPIPE && saved != EINVAL) f->error = saved;
      break;
    }
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += PAUSE_NANOSECONDS;
    if (until.tv_nsec >= 1000000000L) {
      until.tv_sec += 1;
      until.tv_nsec -= 1000000000L;
    }
    while (!f->stopping && pthread_cond_timedwait(&f->wake, &f->lock, &until) == 0) {
    }
  }
  pthread_mutex_unlock(&f->lock);
  return NULL;
}

struct lacuna_flusher *lacuna_flusher_start(int fd) {
  struct lacuna_flusher *f = calloc(1, sizeof *f);
  if (f == NULL) return NULL;
  f->fd = fd;
  pthread_mutex_init(&f->lock, NULL);
  pthread_cond_init(&f->wake, NULL);
  if (pthread_create(&f->thread, NULL, flusher_main, f) != 0) {
    pthread_cond_destroy(&f->wake);
    pthread_mutex_destroy(&f->lock);
    free(f);
    return NULL;
  }
  return f;
}

int lacuna_flusher_stop(struct lacuna_flusher *f) {
  if (f == NULL) return 0;
  pthread_mutex_lock(&f->lock);
  f->stopping = 1;
  pthread_cond_signal(&f->wake);
  pthread_mutex_unlock(&f->lock);
  pthread_join(f->thread, NULL);
  int error = f->error;
  pthread_cond_destroy(&f->wake);
  pthread_mutex_destroy(&f->lock);
  free(f);
  return error;
}

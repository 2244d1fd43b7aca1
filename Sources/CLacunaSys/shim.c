#define _GNU_SOURCE 1
#include "CLacunaSys.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/types.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int64_t lacuna_seek_data(int fd, int64_t offset) {
  return (int64_t)lseek(fd, (off_t)offset, SEEK_DATA);
}

int64_t lacuna_seek_hole(int fd, int64_t offset) {
  return (int64_t)lseek(fd, (off_t)offset, SEEK_HOLE);
}

int lacuna_fallocate(int fd, int64_t offset, int64_t length) {
  return fallocate(fd, 0, (off_t)offset, (off_t)length);
}

int lacuna_punch_hole(int fd, int64_t offset, int64_t length) {
  return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int lacuna_zero_file_range(int fd, int64_t offset, int64_t length) {
  if (fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) == 0) return 0;
  return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int lacuna_clone_range(int dest_fd, int64_t dest_offset, int source_fd, int64_t source_offset, int64_t length) {
  struct file_clone_range range = {
    .src_fd = source_fd, .src_offset = (uint64_t)source_offset, .src_length = (uint64_t)length,
    .dest_offset = (uint64_t)dest_offset};
  return ioctl(dest_fd, FICLONERANGE, &range);
}

int64_t lacuna_file_system_type(int fd) {
  struct statfs info;
  if (fstatfs(fd, &info) != 0) return 0;
  return (int64_t)info.f_type;
}

int64_t lacuna_copy_range(int dest_fd, int64_t dest_offset, int source_fd, int64_t source_offset, int64_t length) {
  loff_t in = (loff_t)source_offset, out = (loff_t)dest_offset;
  return (int64_t)copy_file_range(source_fd, &in, dest_fd, &out, (size_t)length, 0);
}

int lacuna_grow_pipe(int fd, int size) {
  struct stat info;
  if (fstat(fd, &info) != 0 || !S_ISFIFO(info.st_mode)) return -1;
  int current = fcntl(fd, F_GETPIPE_SZ);
  if (current >= size) return current;
  return fcntl(fd, F_SETPIPE_SZ, size);
}

int lacuna_zero_device_range(int fd, int64_t offset, int64_t length) {
  uint64_t range[2] = {(uint64_t)offset, (uint64_t)length};
  return ioctl(fd, BLKZEROOUT, range);
}

int lacuna_make_temporary(char *template_path) {
  return mkostemp(template_path, O_CLOEXEC);
}

void lacuna_byte_histogram(const void *buffer, size_t length, uint64_t *counts) {
  // Four tables so that runs of one byte value do not serialise on one counter.
  uint32_t tables[4][256] = {{0}};
  const unsigned char *p = buffer;
  size_t i = 0;
  for (; i + 4 <= length; i += 4) {
    tables[0][p[i]]++;
    tables[1][p[i + 1]]++;
    tables[2][p[i + 2]]++;
    tables[3][p[i + 3]]++;
  }
  for (; i < length; i++) tables[0][p[i]]++;
  for (int v = 0; v < 256; v++)
    counts[v] += (uint64_t)tables[0][v] + tables[1][v] + tables[2][v] + tables[3][v];
}

#if defined(__x86_64__)
#include <immintrin.h>

// Whether every byte of `p` is zero, 256 bytes at a time in AVX2 registers: 14.5 GB/s on
// these machines where the self-overlapping memcmp does 11.8 (a zero block is read whole;
// it is the engine's largest cost where data is shared rather than copied).
__attribute__((target("avx2"))) static int zero_avx2(const unsigned char *p, size_t length) {
  size_t i = 0;
  for (; i + 256 <= length; i += 256) {
    __m256i a = _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(p + i)),
                                _mm256_loadu_si256((const __m256i *)(p + i + 32)));
    __m256i b = _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(p + i + 64)),
                                _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    __m256i c = _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(p + i + 128)),
                                _mm256_loadu_si256((const __m256i *)(p + i + 160)));
    __m256i d = _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(p + i + 192)),
                                _mm256_loadu_si256((const __m256i *)(p + i + 224)));
    a = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
    if (!_mm256_testz_si256(a, a)) return 0;
  }
  for (; i < length; i++)
    if (p[i]) return 0;
  return 1;
}
#endif

// The first 16 bytes by hand: a data block almost always ends the check there. Then, where
// the CPU lacks AVX2, a memcmp of the bytes with themselves shifted by 16: any non-zero
// byte shows as a mismatch or in the head.
static int block_is_zero(const unsigned char *p, size_t length) {
  size_t head = length < 16 ? length : 16;
  for (size_t i = 0; i < head; i++)
    if (p[i]) return 0;
  if (length <= 16) return 1;
#if defined(__x86_64__)
  if (length >= 256 && __builtin_cpu_supports("avx2")) return zero_avx2(p, length);
#endif
  return memcmp(p, p + 16, length - 16) == 0;
}

int lacuna_is_zero(const void *buffer, size_t length) { return block_is_zero(buffer, length); }

// Where a SIGBUS inside lacuna_zero_prefix returns to, per thread; NULL outside it.
static __thread sigjmp_buf *volatile fault_return;
static struct sigaction previous_bus_action;
static pthread_once_t bus_handler_once = PTHREAD_ONCE_INIT;

static void on_bus_error(int sig, siginfo_t *info, void *context) {
  sigjmp_buf *target = fault_return;
  if (target) {
    fault_return = NULL;
    siglongjmp(*target, 1);
  }
  // Not a guarded read: the previous disposition takes the fault when the instruction
  // runs again (a signal sent by kill is sent again).
  sigaction(SIGBUS, &previous_bus_action, NULL);
  if (info == NULL || info->si_code <= 0) raise(sig);
  (void)context;
}

static void install_bus_handler(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = on_bus_error;
  // NODEFER: the jump out of the handler leaves SIGBUS unblocked without sigsetjmp
  // saving the signal mask (a system call) on every guarded scan.
  action.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  sigaction(SIGBUS, &action, &previous_bus_action);
}

void lacuna_guard_mapped_reads(void) { pthread_once(&bus_handler_once, install_bus_handler); }



int64_t lacuna_zero_prefix(const void *buffer, size_t length, size_t first, size_t block, int *zero) {
  const unsigned char *p = buffer;
  if (length == 0) return 0;
  if (first == 0 || first > length) first = length;
  sigjmp_buf here;
  if (sigsetjmp(here, 0)) return -1;
  fault_return = &here;
  int kind = block_is_zero(p, first);
  size_t position = first;
  while (position < length) {
    size_t size = length - position < block ? length - position : block;
    // Data blocks are decided by their first bytes: fetching the next blocks' first lines
    // early overlaps the cache (and TLB) misses that otherwise come one after another.
    if (!kind && position + 8 * block < length) __builtin_prefetch(p + position + 8 * block);
    if (block_is_zero(p + position, size) != kind) break;
    position += size;
  }
  fault_return = NULL;
  *zero = kind;
  return (int64_t)position;
}

#define CLEANUP_SLOTS 64
static char *volatile cleanup_paths[CLEANUP_SLOTS];

int lacuna_cleanup_register(const char *path) {
  char *copy = strdup(path);
  if (!copy) return -1;
  for (int i = 0; i < CLEANUP_SLOTS; i++) {
    if (__sync_bool_compare_and_swap(&cleanup_paths[i], (char *)0, copy)) return i;
  }
  free(copy);
  return -1;
}

void lacuna_cleanup_unregister(int slot) {
  if (slot < 0 || slot >= CLEANUP_SLOTS) return;
  char *old = __sync_lock_test_and_set(&cleanup_paths[slot], (char *)0);
  free(old);
}

// Every catchable signal whose default action ends the process: each removes the
// temporary files before the process dies of it. (SIGPIPE and SIGXFSZ are ignored: they
// become EPIPE and EFBIG errors, which are reported and clean up the same way.)
static const int cleanup_signals[] = {
  SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGXCPU,
  SIGIO, SIGPWR, SIGSTKFLT,
};
#define CLEANUP_SIGNAL_COUNT (int)(sizeof cleanup_signals / sizeof cleanup_signals[0])

static void cleanup_signal_set(sigset_t *set) {
  sigemptyset(set);
  for (int i = 0; i < CLEANUP_SIGNAL_COUNT; i++) sigaddset(set, cleanup_signals[i]);
}

// While an output is renamed into place, a signal is deferred: the rename and the exit
// status must agree (a signal that killed the process after its output appeared would
// report a failure that did not happen).
static volatile sig_atomic_t committing = 0;
static volatile sig_atomic_t deferred_signal = 0;

int lacuna_make_registered_temporary(char *template_path, int *slot) {
  // With the cleanup signals held back, the file and its cleanup slot come into being
  // together: a signal can no longer land between the two and leave the file behind.
  sigset_t held, previous;
  cleanup_signal_set(&held);
  pthread_sigmask(SIG_BLOCK, &held, &previous);
  int fd = mkostemp(template_path, O_CLOEXEC);
  *slot = fd >= 0 ? lacuna_cleanup_register(template_path) : -1;
  int saved = errno;
  pthread_sigmask(SIG_SETMASK, &previous, NULL);
  errno = saved;
  return fd;
}

int lacuna_block_device_size(int fd, uint64_t *size) {
  return ioctl(fd, BLKGETSIZE64, size);
}

int lacuna_ensure_standard_descriptors(void) {
  // A descriptor 0, 1 or 2 closed at start would be taken by the next open: the output
  // image would become standard output, and progress lines would land in it.
  for (int fd = 0; fd <= 2; fd++) {
    if (fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    int opened = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
    if (opened < 0) return -1;
    if (opened != fd) {
      // Lower descriptors are open, so open() returns the lowest free one: fd itself.
      close(opened);
      return -1;
    }
  }
  return 0;
}

static void cleanup_and_die(int sig) {
  if (committing) {
    deferred_signal = sig;
    return;
  }
  for (int i = 0; i < CLEANUP_SLOTS; i++) {
    char *path = cleanup_paths[i];
    if (path) unlink(path);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

void lacuna_install_signal_handlers(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_handler = cleanup_and_die;
  sigemptyset(&action.sa_mask);
  cleanup_signal_set(&action.sa_mask);
  for (int i = 0; i < CLEANUP_SIGNAL_COUNT; i++) {
    struct sigaction old;
    // A signal the parent left ignored (nohup's SIGHUP) stays ignored.
    if (sigaction(cleanup_signals[i], NULL, &old) == 0 && old.sa_handler == SIG_IGN) continue;
    sigaction(cleanup_signals[i], &action, NULL);
  }
  signal(SIGPIPE, SIG_IGN);
  signal(SIGXFSZ, SIG_IGN);
}

void lacuna_commit_begin(void) {
  deferred_signal = 0;
  committing = 1;
}

void lacuna_commit_end(int succeeded) {
  committing = 0;
  int sig = deferred_signal;
  deferred_signal = 0;
  // The output is in place: the work the signal would have stopped is done, and the
  // process goes on to exit 0. Otherwise the signal takes effect now, cleanup included.
  if (sig && !succeeded) cleanup_and_die(sig);
}

// qemu's image locks (as its file driver takes them, observed with strace and
// /proc/locks): open-file-description read locks on single bytes, 100 + p for each
// permission p held and 200 + p for each permission p not shared with others
// (p: 0 consistent read, 1 write, 2 write unchanged, 3 resize, 4 graph change). A holder
// conflicts with anyone who unshares what it holds, or holds what it unshares.
// One byte's lock: `command` F_OFD_SETLK (take a read lock) or F_OFD_GETLK (ask whether
// another open file description holds one, by asking for a write lock).
static int lock_call(int fd, int command, short type, int64_t byte, struct flock *lock) {
  memset(lock, 0, sizeof *lock);
  lock->l_type = type;
  lock->l_whence = SEEK_SET;
  lock->l_start = byte;
  lock->l_len = 1;
  return fcntl(fd, command, lock);
}

static int lock_byte(int fd, int64_t byte) {
  struct flock lock;
  return lock_call(fd, F_OFD_SETLK, F_RDLCK, byte, &lock);
}

// 1 when another open file description holds a lock on `byte`, 0 when none does, -1 on error.
static int byte_is_locked(int fd, int64_t byte) {
  struct flock lock;
  if (lock_call(fd, F_OFD_GETLK, F_WRLCK, byte, &lock) != 0) return -1;
  return lock.l_type != F_UNLCK;
}

int lacuna_lock_image(int fd, unsigned held, unsigned unshared) {
  for (int p = 0; p < 5; p++) {
    if ((held >> p & 1) && lock_byte(fd, 100 + p) != 0) return -1;
    if ((unshared >> p & 1) && lock_byte(fd, 200 + p) != 0) return -1;
  }
  for (int p = 0; p < 5; p++) {
    int conflict = 0;
    if (held >> p & 1) conflict = byte_is_locked(fd, 200 + p);
    if (conflict == 0 && (unshared >> p & 1)) conflict = byte_is_locked(fd, 100 + p);
    if (conflict != 0) return conflict < 0 ? -1 : 1;
  }
  return 0;
}

int lacuna_open_unnamed(const char *directory) {
  return open(directory, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
}

int lacuna_link_unnamed(int fd, const char *path) {
  char proc_path[64];
  snprintf(proc_path, sizeof proc_path, "/proc/self/fd/%d", fd);
  if (linkat(AT_FDCWD, proc_path, AT_FDCWD, path, AT_SYMLINK_FOLLOW) == 0) return 0;
  if (errno != ENOENT) return -1;
  // Without /proc, AT_EMPTY_PATH does the same (it needs CAP_DAC_READ_SEARCH).
  return linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH);
}

#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>

int lacuna_open_direct(int fd) {
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  return open(path, O_WRONLY | O_DIRECT | O_CLOEXEC);
}

/* A minimal io_uring: one submission queue, writes only. The kernel AIO context this
   replaced cost every process that made one about 35 ms at exit (an RCU grace period in
   exit_aio); a ring is torn down by a kernel worker after close. */
struct lacuna_ring {
  int fd;
  unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
  unsigned *cq_head, *cq_tail, *cq_mask;
  struct io_uring_sqe *sqes;
  struct io_uring_cqe *cqes;
  void *sq_map, *cq_map;
  size_t sq_length, cq_length, sqes_length;
};

struct lacuna_ring *lacuna_ring_open(unsigned entries) {
  struct io_uring_params params;
  memset(&params, 0, sizeof params);
  int fd = (int)syscall(SYS_io_uring_setup, entries, &params);
  if (fd < 0) return NULL;
  struct lacuna_ring *ring = calloc(1, sizeof *ring);
  if (!ring) {
    close(fd);
    errno = ENOMEM;
    return NULL;
  }
  ring->fd = fd;
  ring->sq_length = params.sq_off.array + params.sq_entries * sizeof(unsigned);
  ring->cq_length = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
  if (params.features & IORING_FEAT_SINGLE_MMAP) {
    if (ring->cq_length > ring->sq_length) ring->sq_length = ring->cq_length;
    ring->cq_length = ring->sq_length;
  }
  ring->sq_map = mmap(NULL, ring->sq_length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
  if (ring->sq_map == MAP_FAILED) goto fail;
  if (params.features & IORING_FEAT_SINGLE_MMAP) {
    ring->cq_map = ring->sq_map;
  } else {
    ring->cq_map = mmap(NULL, ring->cq_length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
    if (ring->cq_map == MAP_FAILED) goto fail;
  }
  ring->sqes_length = params.sq_entries * sizeof(struct io_uring_sqe);
  ring->sqes = mmap(NULL, ring->sqes_length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
  if (ring->sqes == MAP_FAILED) goto fail;
  char *sq = ring->sq_map, *cq = ring->cq_map;
  ring->sq_head = (unsigned *)(sq + params.sq_off.head);
  ring->sq_tail = (unsigned *)(sq + params.sq_off.tail);
  ring->sq_mask = (unsigned *)(sq + params.sq_off.ring_mask);
  ring->sq_array = (unsigned *)(sq + params.sq_off.array);
  ring->cq_head = (unsigned *)(cq + params.cq_off.head);
  ring->cq_tail = (unsigned *)(cq + params.cq_off.tail);
  ring->cq_mask = (unsigned *)(cq + params.cq_off.ring_mask);
  ring->cqes = (struct io_uring_cqe *)(cq + params.cq_off.cqes);
  return ring;
fail:;
  int code = errno;
  lacuna_ring_close(ring);
  errno = code;
  return NULL;
}

int lacuna_ring_write(struct lacuna_ring *ring, int fd, const void *buffer, uint32_t length, int64_t offset, uint64_t tag) {
  unsigned tail = *ring->sq_tail;
  unsigned head = __atomic_load_n(ring->sq_head, __ATOMIC_ACQUIRE);
  if (tail - head > *ring->sq_mask) {
    errno = EAGAIN;
    return -1;
  }
  unsigned index = tail & *ring->sq_mask;
  struct io_uring_sqe *sqe = &ring->sqes[index];
  memset(sqe, 0, sizeof *sqe);
  sqe->opcode = IORING_OP_WRITE;
  sqe->fd = fd;
  sqe->addr = (uint64_t)(uintptr_t)buffer;
  sqe->len = length;
  sqe->off = (uint64_t)offset;
  sqe->user_data = tag;
  ring->sq_array[index] = index;
  __atomic_store_n(ring->sq_tail, tail + 1, __ATOMIC_RELEASE);
  long n;
  do { n = syscall(SYS_io_uring_enter, ring->fd, 1, 0, 0, NULL, 0); } while (n < 0 && errno == EINTR);
  if (n == 1) return 0;
  if (n >= 0) errno = EAGAIN;
  /* Not taken: withdraw it. */
  __atomic_store_n(ring->sq_tail, tail, __ATOMIC_RELEASE);
  return -1;
}

int lacuna_ring_reap(struct lacuna_ring *ring, int minimum, int maximum, uint64_t *tags, int64_t *results) {
  int n = 0;
  for (;;) {
    unsigned head = *ring->cq_head;
    unsigned tail = __atomic_load_n(ring->cq_tail, __ATOMIC_ACQUIRE);
    while (head != tail && n < maximum) {
      struct io_uring_cqe *cqe = &ring->cqes[head & *ring->cq_mask];
      tags[n] = cqe->user_data;
      results[n] = cqe->res;
      n++;
      head++;
    }
    __atomic_store_n(ring->cq_head, head, __ATOMIC_RELEASE);
    if (n >= minimum || n >= maximum) return n;
    long r = syscall(SYS_io_uring_enter, ring->fd, 0, (unsigned)(minimum - n), IORING_ENTER_GETEVENTS, NULL, 0);
    if (r < 0 && errno != EINTR) return -1;
  }
}

void lacuna_ring_close(struct lacuna_ring *ring) {
  if (!ring) return;
  if (ring->sqes && ring->sqes != MAP_FAILED) munmap(ring->sqes, ring->sqes_length);
  if (ring->cq_map && ring->cq_map != MAP_FAILED && ring->cq_map != ring->sq_map) munmap(ring->cq_map, ring->cq_length);
  if (ring->sq_map && ring->sq_map != MAP_FAILED) munmap(ring->sq_map, ring->sq_length);
  close(ring->fd);
  free(ring);
}

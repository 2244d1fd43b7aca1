// System calls that Swift's Glibc module hides (they need _GNU_SOURCE) or that must be
// async-signal-safe. The header includes only <stddef.h> and <stdint.h>: defining
// _GNU_SOURCE here would give Glibc's structs a second, clashing definition in Swift.
// shim.c defines _GNU_SOURCE and holds the real calls.
#ifndef CLACUNASYS_H
#define CLACUNASYS_H
#include <stddef.h>
#include <stdint.h>

/// lseek(fd, offset, SEEK_DATA); -1 with errno (ENXIO: no data at or after offset).
int64_t lacuna_seek_data(int fd, int64_t offset);

/// lseek(fd, offset, SEEK_HOLE); the end of the file counts as a hole.
int64_t lacuna_seek_hole(int fd, int64_t offset);

/// fallocate(fd, 0, offset, length): reserve blocks, extending the file if needed.
int lacuna_fallocate(int fd, int64_t offset, int64_t length);

/// fallocate(fd, PUNCH_HOLE|KEEP_SIZE, ...): free blocks, reads return zeros.
int lacuna_punch_hole(int fd, int64_t offset, int64_t length);

/// Makes a file range read as zeros: fallocate(ZERO_RANGE), else PUNCH_HOLE (both
/// KEEP_SIZE). -1 and errno when neither works.
int lacuna_zero_file_range(int fd, int64_t offset, int64_t length);
/// Makes `length` bytes of `dest_fd` at `dest_offset` share the extents of `source_fd` at
/// `source_offset` (ioctl FICLONERANGE: XFS with reflink, btrfs, bcachefs). Offsets and
/// length must be multiples of the file system's block size. 0, or -1 and errno
/// (EOPNOTSUPP, EXDEV, EINVAL where the file system cannot).
int lacuna_clone_range(int dest_fd, int64_t dest_offset, int source_fd, int64_t source_offset, int64_t length);
/// The file system type of `fd` (statfs f_type: 0xEF53 ext2/3/4, 0x01021994 tmpfs, ...),
/// or 0 when fstatfs fails.
int64_t lacuna_file_system_type(int fd);
/// copy_file_range(2) of up to `length` bytes; returns the bytes copied, or -1 and errno.
int64_t lacuna_copy_range(int dest_fd, int64_t dest_offset, int source_fd, int64_t source_offset, int64_t length);
/// Opens the file of `fd` again (/proc/self/fd), write-only with O_DIRECT: a description
/// of its own, so the flag does not reach `fd`. -1 and errno on failure.
int lacuna_open_direct(int fd);
/// An io_uring for writes that bypass the page cache (`DirectLane`).
struct lacuna_ring;
/// A ring of `entries` submissions, or NULL and errno (io_uring_setup refused or disabled).
struct lacuna_ring *lacuna_ring_open(unsigned entries);
/// Submits one write of `length` bytes from `buffer` at `offset` of `fd`, tagged `tag`:
/// 0, or -1 and errno (EAGAIN: the ring is full).
int lacuna_ring_write(struct lacuna_ring *ring, int fd, const void *buffer, uint32_t length, int64_t offset, uint64_t tag);
/// Finished writes, waiting for at least `minimum`: their tags and results (bytes written,
/// or -errno); returns how many (at most `maximum`), or -1 and errno.
int lacuna_ring_reap(struct lacuna_ring *ring, int minimum, int maximum, uint64_t *tags, int64_t *results);
/// Closes the ring; the kernel finishes and frees it in the background. Writes must be
/// reaped first.
void lacuna_ring_close(struct lacuna_ring *ring);
/// When `fd` is a pipe holding less than `size` bytes, asks for `size` (F_SETPIPE_SZ):
/// fewer, larger reads and fewer switches between writer and reader. Returns the capacity,
/// or -1 when `fd` is not a pipe or the kernel refuses (over /proc/sys/fs/pipe-max-size).
int lacuna_grow_pipe(int fd, int size);
/// Makes a block device range (512-byte aligned) read as zeros: ioctl BLKZEROOUT.
int lacuna_zero_device_range(int fd, int64_t offset, int64_t length);

/// mkostemp(template, O_CLOEXEC): create a new file from a XXXXXX template.
int lacuna_make_temporary(char *template_path);

/// Counts each byte value of `buffer` into `counts[256]` (which the caller zeroes).
void lacuna_byte_histogram(const void *buffer, size_t length, uint64_t *counts);

/// True when all `length` bytes at `buffer` are zero (vectorised by the compiler and libc).
int lacuna_is_zero(const void *buffer, size_t length);

/// The length of the longest prefix of `buffer` made of blocks that are all zero, or all
/// not zero, like its first block: the first block is `first` bytes (at most `length`),
/// the next ones `block` bytes, the last may be short. `*zero` says which kind the prefix
/// is. A block found non-zero costs reading up to its first non-zero byte, so data blocks
/// cost about one cache line each. Returns -1 when reading faulted (SIGBUS: a mapped file
/// was truncated) and `lacuna_guard_mapped_reads` was called before.
int64_t lacuna_zero_prefix(const void *buffer, size_t length, size_t first, size_t block, int *zero);

/// Installs (once) the SIGBUS handler that turns a fault inside `lacuna_zero_prefix` into
/// its -1 return; other SIGBUS faults go to the disposition that was there before.
void lacuna_guard_mapped_reads(void);

/// Around the final rename: signals that arrive in between are deferred; after a rename
/// that succeeded they are dropped (the output is complete and in place), after one that
/// failed they take effect, temporary files removed.
void lacuna_commit_begin(void);
void lacuna_commit_end(int succeeded);

/// lacuna_make_temporary, and the new path registered for cleanup (`*slot`), with the
/// cleanup signals held back in between so none can leave the file behind.
int lacuna_make_registered_temporary(char *template_path, int *slot);

/// The size of the block device open at `fd` (ioctl BLKGETSIZE64); -1 and errno on failure.
int lacuna_block_device_size(int fd, uint64_t *size);

/// Takes qemu's image locks on `fd`: the permissions in `held` and the ones in `unshared`
/// (bit 0 consistent read, 1 write, 2 write unchanged, 3 resize, 4 graph change). Returns
/// 0 when taken, 1 when another process conflicts (a VM writing the image), -1 with errno
/// when the file system has no such locks.
int lacuna_lock_image(int fd, unsigned held, unsigned unshared);

/// Opens /dev/null on each of descriptors 0, 1 and 2 that is closed, so no file lacuna
/// opens later takes their place. Returns -1 when that fails.
int lacuna_ensure_standard_descriptors(void);

/// Remember a path to unlink if SIGINT, SIGTERM or SIGHUP arrives. Returns a slot, or -1
/// when the table is full.
int lacuna_cleanup_register(const char *path);
/// Forget a slot once its file was renamed into place or removed.
void lacuna_cleanup_unregister(int slot);
/// Install the handlers: unlink every registered path, then die of the same signal.
/// Also ignores SIGPIPE and SIGXFSZ so that writes fail with EPIPE and EFBIG instead.
void lacuna_install_signal_handlers(void);

/// A background thread that writes an output file's dirty pages to disk while the file is
/// still being written (flusher.c). NULL when the thread cannot be started, which only
/// loses the overlap: the final fsync still writes everything.
typedef struct lacuna_flusher lacuna_flusher;
lacuna_flusher *lacuna_flusher_start(int fd);
/// Stops and frees the thread (NULL is allowed). Returns 0, or the errno of a write error
/// it saw: the kernel reports such an error once per descriptor, so the caller must treat
/// it as the fsync's.
int lacuna_flusher_stop(lacuna_flusher *flusher);


/// An unnamed file in `directory` (O_TMPFILE), which vanishes with the process unless
/// linked; -1 with errno where the file system cannot (EOPNOTSUPP, EISDIR, EINVAL).
int lacuna_open_unnamed(const char *directory);

/// Gives the unnamed file `fd` the name `path` (linkat through /proc/self/fd, or
/// AT_EMPTY_PATH without /proc). Fails with EEXIST when `path` exists.
int lacuna_link_unnamed(int fd, const char *path);

#endif

// libnbd, loaded when an NBD URI is first used rather than linked: linking it loads
// libnbd's own dependencies (GnuTLS, libxml2, ICU, p11-kit: 15 more libraries) and runs
// their constructors at every start, 2.2 ms of a conversion that may take 40 ms. The
// types and constants come from libnbd.h; the functions lacuna calls are reached through
// `lacuna_nbd_*`, valid only after `lacuna_nbd_load()` returned 0.
#ifndef LACUNA_CLIBNBD_H
#define LACUNA_CLIBNBD_H

#include <libnbd.h>

// The libnbd functions lacuna uses: X(name) for each nbd_<name>.
#define LACUNA_NBD_FUNCTIONS(X) \
  X(create) X(close) X(get_error) X(get_errno) X(get_version) X(add_meta_context) \
  X(set_uri_allow_local_file) X(aio_connect_uri) X(aio_is_connecting) X(aio_is_ready) \
  X(aio_is_dead) X(aio_is_closed) X(poll) X(shutdown) X(get_size) X(get_block_size) \
  X(can_zero) X(can_fast_zero) X(can_multi_conn) X(is_read_only) X(can_flush) \
  X(can_meta_context) X(aio_command_completed) X(aio_in_flight) X(aio_pread) X(aio_pwrite) \
  X(aio_zero) X(aio_flush) X(aio_block_status) X(aio_get_direction) X(aio_get_fd) \
  X(aio_notify_read) X(aio_notify_write)

struct lacuna_nbd_api {
#define LACUNA_NBD_FIELD(name) __typeof__(nbd_##name) *name;
  LACUNA_NBD_FUNCTIONS(LACUNA_NBD_FIELD)
#undef LACUNA_NBD_FIELD
};
extern struct lacuna_nbd_api lacuna_nbd;

/// Loads libnbd.so.0 and finds its functions, once per process (safe from any thread).
/// 0 when they are there; -1 otherwise, with `lacuna_nbd_load_error()` saying why.
int lacuna_nbd_load(void);
/// Why the load failed (dlerror's text), or NULL.
const char *lacuna_nbd_load_error(void);

static inline struct nbd_handle *lacuna_nbd_create(void) { return lacuna_nbd.create(); }
static inline void lacuna_nbd_close(struct nbd_handle *h) { lacuna_nbd.close(h); }
static inline const char *lacuna_nbd_get_error(void) { return lacuna_nbd.get_error(); }
static inline int lacuna_nbd_get_errno(void) { return lacuna_nbd.get_errno(); }
static inline const char *lacuna_nbd_get_version(struct nbd_handle *h) { return lacuna_nbd.get_version(h); }
static inline int lacuna_nbd_add_meta_context(struct nbd_handle *h, const char *name) {
  return lacuna_nbd.add_meta_context(h, name);
}
static inline int lacuna_nbd_set_uri_allow_local_file(struct nbd_handle *h, bool allow) {
  return lacuna_nbd.set_uri_allow_local_file(h, allow);
}
static inline int lacuna_nbd_aio_connect_uri(struct nbd_handle *h, const char *uri) {
  return lacuna_nbd.aio_connect_uri(h, uri);
}
static inline int lacuna_nbd_aio_is_connecting(struct nbd_handle *h) { return lacuna_nbd.aio_is_connecting(h); }
static inline int lacuna_nbd_aio_is_ready(struct nbd_handle *h) { return lacuna_nbd.aio_is_ready(h); }
static inline int lacuna_nbd_aio_is_dead(struct nbd_handle *h) { return lacuna_nbd.aio_is_dead(h); }
static inline int lacuna_nbd_aio_is_closed(struct nbd_handle *h) { return lacuna_nbd.aio_is_closed(h); }
static inline int lacuna_nbd_poll(struct nbd_handle *h, int timeout) { return lacuna_nbd.poll(h, timeout); }
static inline int lacuna_nbd_shutdown(struct nbd_handle *h, uint32_t flags) { return lacuna_nbd.shutdown(h, flags); }
static inline int64_t lacuna_nbd_get_size(struct nbd_handle *h) { return lacuna_nbd.get_size(h); }
static inline int64_t lacuna_nbd_get_block_size(struct nbd_handle *h, int size_type) {
  return lacuna_nbd.get_block_size(h, size_type);
}
static inline int lacuna_nbd_can_zero(struct nbd_handle *h) { return lacuna_nbd.can_zero(h); }
static inline int lacuna_nbd_can_fast_zero(struct nbd_handle *h) { return lacuna_nbd.can_fast_zero(h); }
static inline int lacuna_nbd_can_multi_conn(struct nbd_handle *h) { return lacuna_nbd.can_multi_conn(h); }
static inline int lacuna_nbd_is_read_only(struct nbd_handle *h) { return lacuna_nbd.is_read_only(h); }
static inline int lacuna_nbd_can_flush(struct nbd_handle *h) { return lacuna_nbd.can_flush(h); }
static inline int lacuna_nbd_can_meta_context(struct nbd_handle *h, const char *name) {
  return lacuna_nbd.can_meta_context(h, name);
}
static inline int lacuna_nbd_aio_command_completed(struct nbd_handle *h, uint64_t cookie) {
  return lacuna_nbd.aio_command_completed(h, cookie);
}
static inline int64_t lacuna_nbd_aio_in_flight(struct nbd_handle *h) { return lacuna_nbd.aio_in_flight(h); }
static inline int64_t lacuna_nbd_aio_pread(
    struct nbd_handle *h, void *buf, size_t count, uint64_t offset, nbd_completion_callback done, uint32_t flags) {
  return lacuna_nbd.aio_pread(h, buf, count, offset, done, flags);
}
static inline int64_t lacuna_nbd_aio_pwrite(
    struct nbd_handle *h, const void *buf, size_t count, uint64_t offset, nbd_completion_callback done,
    uint32_t flags) {
  return lacuna_nbd.aio_pwrite(h, buf, count, offset, done, flags);
}
static inline int64_t lacuna_nbd_aio_zero(
    struct nbd_handle *h, uint64_t count, uint64_t offset, nbd_completion_callback done, uint32_t flags) {
  return lacuna_nbd.aio_zero(h, count, offset, done, flags);
}
static inline int64_t lacuna_nbd_aio_flush(struct nbd_handle *h, nbd_completion_callback done, uint32_t flags) {
  return lacuna_nbd.aio_flush(h, done, flags);
}
static inline int64_t lacuna_nbd_aio_block_status(
    struct nbd_handle *h, uint64_t count, uint64_t offset, nbd_extent_callback extent, nbd_completion_callback done,
    uint32_t flags) {
  return lacuna_nbd.aio_block_status(h, count, offset, extent, done, flags);
}
static inline unsigned lacuna_nbd_aio_get_direction(struct nbd_handle *h) { return lacuna_nbd.aio_get_direction(h); }
static inline int lacuna_nbd_aio_get_fd(struct nbd_handle *h) { return lacuna_nbd.aio_get_fd(h); }
static inline int lacuna_nbd_aio_notify_read(struct nbd_handle *h) { return lacuna_nbd.aio_notify_read(h); }
static inline int lacuna_nbd_aio_notify_write(struct nbd_handle *h) { return lacuna_nbd.aio_notify_write(h); }

#endif

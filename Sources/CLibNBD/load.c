#include "CLibNBD.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

struct lacuna_nbd_api lacuna_nbd;

static pthread_once_t once = PTHREAD_ONCE_INIT;
static int loaded = -1;
static char failure[512];

static void load(void) {
  // libnbd's soname; Debian's libnbd0 package holds it.
  void *library = dlopen("libnbd.so.0", RTLD_NOW | RTLD_LOCAL);
  if (library == NULL) {
    const char *why = dlerror();
    snprintf(failure, sizeof failure, "%s", why ? why : "libnbd.so.0: cannot load");
    return;
  }
#define LACUNA_NBD_FIND(name)                                                          \
  lacuna_nbd.name = (__typeof__(nbd_##name) *)dlsym(library, "nbd_" #name);            \
  if (lacuna_nbd.name == NULL) {                                                       \
    snprintf(failure, sizeof failure, "libnbd.so.0 has no nbd_%s (too old a libnbd)", #name); \
    return;                                                                            \
  }
  LACUNA_NBD_FUNCTIONS(LACUNA_NBD_FIND)
#undef LACUNA_NBD_FIND
  loaded = 0;
}

int lacuna_nbd_load(void) {
  pthread_once(&once, load);
  return loaded;
}

const char *lacuna_nbd_load_error(void) { return loaded == 0 ? NULL : failure; }

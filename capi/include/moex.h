#ifndef MOEX_H
#define MOEX_H
/* moex.h: the stable C ABI of moex (placeholder until the C API lands). */
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#if defined(MOEX_BUILDING_LIBRARY)
#define MOEX_API __declspec(dllexport)
#else
#define MOEX_API __declspec(dllimport)
#endif
#else
#define MOEX_API __attribute__((visibility("default")))
#endif

#define MOEX_VERSION_MAJOR 0
#define MOEX_VERSION_MINOR 1
#define MOEX_VERSION_PATCH 0
#define MOEX_VERSION_NUMBER (MOEX_VERSION_MAJOR * 10000 + MOEX_VERSION_MINOR * 100 + MOEX_VERSION_PATCH)

#ifdef __cplusplus
extern "C" {
#endif

/** The library's version as MOEX_VERSION_NUMBER computes it. @since 0.1 */
MOEX_API uint32_t moex_version_number(void);

#ifdef __cplusplus
}
#endif
#endif /* MOEX_H */

/*
 * Sleeps that go straight to the kernel, preloaded ahead of libfaketime.
 *
 * libfaketime 0.9.10 (Debian 12) rewrites every clock_nanosleep() deadline as if it were on the
 * faked clock. With the monotonic clock left true, that makes each time.sleep() in Python (an
 * absolute CLOCK_MONOTONIC deadline) fail with EINVAL. The fast-clock worker only needs its
 * wall clock shifted, so its sleeps bypass libfaketime here and keep their real meaning.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_nanosleep(clockid_t clock, int flags, const struct timespec *request, struct timespec *remain)
{
    /* clock_nanosleep reports errors as its return value, not through errno */
    return syscall(SYS_clock_nanosleep, clock, flags, request, remain) == 0 ? 0 : errno;
}

int nanosleep(const struct timespec *request, struct timespec *remain)
{
    return syscall(SYS_clock_nanosleep, CLOCK_REALTIME, 0, request, remain) == 0 ? 0 : -1;
}

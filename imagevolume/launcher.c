/*
 * bin/openshell-supervisor in the supervisor's tree (imagevolume/bundle.py): the one command a pod
 * names. A static executable, so it runs in any image, with no loader and no libc of the image's.
 *
 * It finds the tree from its own path (ROOT/bin/openshell-supervisor) and executes
 *
 *     ROOT/lib/ld.so --library-path ROOT/lib ROOT/bin/python3 -I -S ROOT/openshell-supervisor.py ARGS...
 *
 * Before that it moves the image's LD_PRELOAD and LD_AUDIT aside (to OPENSHELL_SANDBOX_LD_PRELOAD
 * and OPENSHELL_SANDBOX_LD_AUDIT): the tree's loader would otherwise load the image's preloaded
 * libraries (a malloc built against a newer glibc than the tree's stops the supervisor from
 * starting). The supervisor puts them back for the sandbox's own programs (supervisor/childenv.py).
 *
 * At the image's root (ROOT is "/", the init container of the fallback) the interpreter does not
 * look for its standard library, so PYTHONHOME says where and -P -s -S replace -I (which would
 * ignore PYTHONHOME); that container's environment is the gateway's alone.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NAME "openshell-supervisor"

static void fail(const char *what) {
    perror(NAME ": launcher");
    fprintf(stderr, NAME ": launcher: %s\n", what);
    exit(126);
}

static void move_aside(const char *name, const char *saved) {
    const char *value = getenv(name);
    if (value == NULL)
        return;
    if (setenv(saved, value, 1) != 0 || unsetenv(name) != 0)
        fail("cannot set the environment");
}

static char *joined(const char *root, const char *rest) {
    size_t size = strlen(root) + strlen(rest) + 1;
    char *path = malloc(size);
    if (path == NULL)
        fail("out of memory");
    snprintf(path, size, "%s%s", root, rest);
    return path;
}

int main(int argc, char **argv) {
    char root[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", root, sizeof root - 1);
    if (n < 0)
        fail("cannot read /proc/self/exe (is /proc mounted?)");
    root[n] = '\0';
    /* ROOT/bin/openshell-supervisor -> ROOT */
    for (int up = 0; up < 2; up++) {
        char *slash = strrchr(root, '/');
        if (slash == NULL)
            fail("the launcher is not at ROOT/bin/" NAME);
        *slash = '\0';
    }
    int at_image_root = root[0] == '\0';

    move_aside("LD_PRELOAD", "OPENSHELL_SANDBOX_LD_PRELOAD");
    move_aside("LD_AUDIT", "OPENSHELL_SANDBOX_LD_AUDIT");
    if (at_image_root && setenv("PYTHONHOME", "/", 1) != 0)
        fail("cannot set PYTHONHOME");

    char **args = calloc((size_t)argc + 10, sizeof *args);
    if (args == NULL)
        fail("out of memory");
    int i = 0;
    char *loader = joined(root, "/lib/ld.so");
    args[i++] = loader;
    args[i++] = "--library-path";
    args[i++] = joined(root, "/lib");
    args[i++] = joined(root, "/bin/python3");
    if (at_image_root) {
        args[i++] = "-P";
        args[i++] = "-s";
    } else {
        args[i++] = "-I";
    }
    args[i++] = "-S";
    args[i++] = joined(root, "/" NAME ".py");
    for (int j = 1; j < argc; j++)
        args[i++] = argv[j];
    args[i] = NULL;
    execv(loader, args);
    perror(NAME ": launcher: cannot execute the tree's loader");
    return 127;
}

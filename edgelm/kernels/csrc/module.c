/* An empty Python module around kernels.c: the package's install builds it with the machine's C compiler
 * (setup.py), and edgelm.kernels loads the same shared object with ctypes to call the ek_* functions. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "edgelm's compiled CPU kernels", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }

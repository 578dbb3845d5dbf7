// The `segkernels` operator library itself: each op declares its schemas in
// csrc/<op>/<op>_schema.cpp (TORCH_LIBRARY_FRAGMENT) and registers its kernels next to their
// code; fake kernels and autograd are registered from Python.
//
// Why TORCH_LIBRARY and not pybind11 bindings: ops in the dispatcher work with torch.compile
// (through their fake kernels), torch.library.opcheck, autograd registered once per op, the
// CPU/CUDA dispatch by tensor device, and a C++ ABI that needs no Python types.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(segkernels, m) {
  // Lets Python ask whether CUDA kernels were compiled in.
  m.def("built_with_cuda() -> bool", []() -> bool {
#ifdef SEGKERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

// `import segkernels._C` loads this library, which runs the static registrations;
// the module itself carries no Python functions.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Schemas of the tempered-softmax distillation ops in the `segkernels` library. The kernels register next to
// their code (TORCH_LIBRARY_IMPL in kd_loss_cpu.cpp; the CUDA kernels are Triton); fake kernels and autograd are registered from
// Python (segkernels/ops/kd_loss/registration.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(segkernels, m) {
  // kd_loss: K students against one teacher read once; returns the loss map (K, N, *spatial)
  // (spatial=False: softmax over channels, positions whose label is ignore_index give 0) or
  // (K, N, C) (spatial=True: softmax over each (n, c) row), in float32 (float64 for float64
  // inputs), each student's gradient of the sum of its map, in the input dtype, and with
  // teacher_grad the teacher's gradient of each student's map sum (an empty list without).
  // seg_kd_loss: hard CE + soft KD in one pass; returns the 0-d loss, the student's gradient of
  // it, and with teacher_grad the teacher's (an empty tensor without).
  // divergence: 0 KL(teacher || student), 1 soft cross-entropy, 2 KL(student || teacher), 3 the
  // generalised Jensen-Shannon divergence with mixture weight beta (for the teacher).
  m.def("kd_loss(Tensor[] students, Tensor teacher, Tensor? labels, float temperature, bool spatial, int divergence, "
        "bool scale_by_t2, int ignore_index, bool teacher_grad=False, float beta=0.5) -> (Tensor, Tensor[], Tensor[])");
  m.def("seg_kd_loss(Tensor student, Tensor teacher, Tensor labels, Tensor? class_weight, float temperature, "
        "float hard_weight, float soft_weight, int ignore_index, bool teacher_grad=False) -> (Tensor, Tensor, Tensor)");
}

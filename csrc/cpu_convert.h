// Loads and stores in the accumulation type for CPU kernel bodies compiled once per target
// (baseline, AVX2, AVX-512). No include guard on purpose: each kernel header includes it inside
// its target's namespace, so the conversions are compiled for that target and inline into its
// vector loops. bfloat16 is converted here (a shift, and round-to-nearest-even).
template <typename T>
inline at::opmath_type<T> load_acc(T v) {
  return static_cast<at::opmath_type<T>>(v);
}
inline float load_acc(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T, typename A>
inline T store_as(A v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 store_as<c10::BFloat16, float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint16_t out = v != v ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(out, c10::BFloat16::from_bits());
}

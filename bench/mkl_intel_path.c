/* Benchmarks only: make Intel MKL take its Intel code paths on any x86-64 CPU.
 *
 * MKL picks its fast AVX-512/AVX2 kernels only after asking mkl_serv_intel_cpu_true() whether
 * the CPU is an Intel one; on an AMD CPU it falls back to slower generic kernels, and every
 * aten matrix product (transformers' and ours) slows down 1.5-2x. Preloading this answer makes
 * an AMD machine run MKL as an Intel machine of the same ISA would, so the speed-ups that do not
 * depend on the BLAS vendor can be measured here (bench/as_intel_mkl.sh builds and preloads it).
 */
int mkl_serv_intel_cpu_true(void) { return 1; }

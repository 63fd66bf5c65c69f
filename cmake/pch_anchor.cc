// Anchor translation unit for the shared LibTorch precompiled header (see top-level CMakeLists.txt).
namespace ds_internal {
int PchAnchor() { return 0; }
}  // namespace ds_internal

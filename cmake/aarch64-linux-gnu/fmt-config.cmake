# fmt for the AArch64 cross build (cmake/aarch64-linux-gnu.cmake): the
# host's headers, header-only, instead of the host's x86-64 libfmt.
if(NOT TARGET fmt::fmt)
  add_library(fmt::fmt INTERFACE IMPORTED)
  set_target_properties(fmt::fmt PROPERTIES INTERFACE_COMPILE_DEFINITIONS FMT_HEADER_ONLY=1)
endif()
set(fmt_FOUND TRUE)

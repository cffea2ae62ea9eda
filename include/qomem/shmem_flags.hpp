// qomem/shmem_flags.hpp — the access a back-end asks for when it maps a file
// into a VIRTIO shared memory region (shmem.hpp), as the vhost-user MMap
// flags encode it (vhost_user/wire.hpp).
//
//     dev->shmem_map(0, fd, 0, 0x200000, 0x10000, qomem::shmem_flags::read_write);
#pragma once

#include <cstdint>

namespace qomem {

/// Bit 0 (VHOST_USER_FLAG_MAP_RW) set: read-write; clear: read-only. Every
/// other bit is invalid: a value carrying one is refused (shmem_error
/// bad_flags), never truncated.
enum class shmem_flags : std::uint64_t {
    read_only = 0,
    read_write = 1,
};

} // namespace qomem

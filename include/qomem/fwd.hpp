// qomem/fwd.hpp — forward declarations of the public classes, for headers
// and users that only name them.
//
//     #include <qomem/fwd.hpp>
//     void attach(qomem::memory_system& sys, qomem::memory_region& mr);
#pragma once

namespace boost {
template <class T>
class intrusive_ptr;
} // namespace boost

namespace qomem {

/// The normal way to hold a reference to an object: an intrusive pointer.
template <class T>
using ref_ptr = boost::intrusive_ptr<T>;

// QOM (object.hpp, device.hpp, machine.hpp)
class object;
class container;
class device;
class bus;
class machine;

// The memory API
class memory_region;      // memory_region.hpp
class region_ref;         // memory_region.hpp
class memory_system;      // memory_system.hpp
class memory_transaction; // memory_system.hpp
class flat_view;          // flat_view.hpp
struct flat_range;        // flat_view.hpp
class memory_listener;    // memory_listener.hpp
struct memory_section;    // memory_listener.hpp
class dma_mapping;        // dma.hpp
class address_space;      // address_space.hpp

} // namespace qomem

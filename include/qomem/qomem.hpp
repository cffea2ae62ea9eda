// qomem: umbrella header. Includes every public header of the library except
// the optional ones with extra dependencies (fixture.hpp needs nlohmann-json).
#pragma once

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/error.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/hotplug.hpp>
#include <qomem/log.hpp>
#include <qomem/memory_listener.hpp>
#include <qomem/memory_ops.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/mtree.hpp>
#include <qomem/object.hpp>
#include <qomem/property.hpp>
#include <qomem/qom_tree.hpp>
#include <qomem/rcu.hpp>
#include <qomem/shmem.hpp>
#include <qomem/type.hpp>
#include <qomem/type_registry.hpp>
#include <qomem/user_creatable.hpp>
#include <qomem/vhost_user.hpp>

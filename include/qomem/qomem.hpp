// qomem: umbrella header. Includes every public header of the library except
// the optional ones with extra dependencies (fixture.hpp needs nlohmann-json).
#pragma once

#include <qomem/address_space.hpp>
#include <qomem/assert.hpp>
#include <qomem/device.hpp>
#include <qomem/error.hpp>
#include <qomem/flat_view.hpp>
#include <qomem/memory_region.hpp>
#include <qomem/mtree.hpp>
#include <qomem/object.hpp>
#include <qomem/type.hpp>

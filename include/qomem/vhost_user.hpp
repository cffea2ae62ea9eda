// qomem/vhost_user.hpp — vhost-user, all of it (umbrella): a back-end needs
// only the first two, which do not depend on address spaces.
//
//     #include <qomem/vhost_user.hpp>
//     namespace vu = qomem::vhost_user;
//     vu::frontend fe(vu::channel::connect(path), guest);
#pragma once

#include <qomem/vhost_user/backend_requests.hpp> // SHMEM_MAP / UNMAP, MEM_READ / WRITE from a back-end
#include <qomem/vhost_user/channel.hpp>          // the Unix socket, with SCM_RIGHTS
#include <qomem/vhost_user/frontend.hpp>         // the front-end session
#include <qomem/vhost_user/unique_fd.hpp>        // an owned fd
#include <qomem/vhost_user/virtqueue.hpp>        // a split virtqueue in guest RAM, driver side
#include <qomem/vhost_user/wire.hpp>             // constants, layouts, encode / decode

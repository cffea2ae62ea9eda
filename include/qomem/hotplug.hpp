// qomem/hotplug.hpp — the hotplug protocol's two parties besides the device:
// the hotplug handler a bus or a machine provides (QEMU's HotplugHandler
// interface) and the machine's event channel that announces a device's
// deletion (QMP's DEVICE_DELETED).
//
// The protocol, run by device.hpp:
//  * plug: realize() asks the handler — the machine's for that device if it
//    claims it (machine::get_hotplug_handler), otherwise the device's bus's
//    — pre_plug(dev) before the device's own realize step, plug(dev) after.
//  * device_del(dev): the handler's unplug_request(dev). A handler without a
//    guest handshake returns false and the unplug completes at once; one
//    with a handshake (PCIe's attention button, ACPI's eject method) tells
//    the guest and returns true, and when the guest acknowledges (writes an
//    eject register, say) calls complete_unplug(dev): the handler's
//    unplug(dev), then the device is unrealized and unparented.
//  * DEVICE_DELETED {id, path} is announced when the device is finalized —
//    not when it is unparented: its memory regions hold it until they are
//    freed, so the event comes after the last DMA mapping of its memory is
//    unmapped. The event channel is shared by the machine and the devices
//    realized on it, so a device finalized after its machine still announces.
//
//     class slot_controller : public qomem::device, public qomem::hotplug_handler {
//         QOMEM_OBJECT(slot_controller, "slot-ctrl", qomem::device, qomem::hotplug_handler)
//     public:
//         bool unplug_request(qomem::device& d) override {
//             pending = &d;  // and raise the attention bit the guest reads
//             return true;   // the unplug waits for the guest
//         }
//         void eject_written() {  // the guest wrote the eject register
//             qomem::complete_unplug(*std::exchange(pending, nullptr));
//         }
//         qomem::device* pending = nullptr;
//     };
#pragma once

#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <qomem/type.hpp>

namespace qomem {

class device;

/// QEMU's HotplugHandler: implemented by the device (or machine) that owns a
/// bus's slots. Every hook runs on the thread making topology changes.
struct hotplug_handler {
    QOMEM_INTERFACE(hotplug_handler, "hotplug-handler")

    /// Before `dev` is realized: check that it may be plugged here (a free
    /// slot, matching capabilities). Throw to refuse; nothing has changed.
    virtual void pre_plug(device& dev) { (void)dev; }
    /// After `dev` is realized: wire it up (claim the slot, raise the
    /// hotplug interrupt). Throw to refuse; the device is unrealized again.
    virtual void plug(device& dev) { (void)dev; }
    /// device_del asks for `dev` to be removed. Return false when there is no
    /// guest handshake: the unplug then completes at once. Return true after
    /// telling the guest: the unplug completes when this handler calls
    /// complete_unplug(dev), once the guest has released the device. Throw to
    /// refuse (the device is then not pending removal).
    virtual bool unplug_request(device& dev) {
        (void)dev;
        return false;
    }
    /// The unplug completes: undo what plug did (free the slot). The device
    /// is unrealized and unparented right after.
    virtual void unplug(device& dev) { (void)dev; }
};

/// QMP's DEVICE_DELETED: a device that had been realized and then
/// unrealized was finalized.
struct device_deleted {
    std::string id;   ///< its id (device::id()), "" if it had none
    std::string path; ///< its canonical path while it was realized ("" if none)
    bool operator==(const device_deleted&) const = default;
};

/// A machine's event channel: events queue here until taken, and a
/// listener, if set, is told of each as it happens (on the thread that
/// finalized the device). Shared by the machine and the devices realized on
/// it. Thread-safe.
class device_events {
public:
    /// Installs `f` (empty: none). `f` must not throw; it runs with no lock
    /// held and may call take().
    void set_listener(std::function<void(const device_deleted&)> f) {
        std::lock_guard lock(mutex_);
        listener_ = std::move(f);
    }
    /// The events not taken yet, oldest first; the queue is then empty.
    std::vector<device_deleted> take() {
        std::lock_guard lock(mutex_);
        return std::exchange(queue_, {});
    }
    /// Queues `e` and tells the listener. Called by a device's finalizer.
    void announce(const device_deleted& e) noexcept {
        std::function<void(const device_deleted&)> f;
        try {
            std::lock_guard lock(mutex_);
            queue_.push_back(e);
            f = listener_;
        } catch (...) {
            return; // out of memory: the event is lost, the finalization goes on
        }
        if (f) {
            try {
                f(e);
            } catch (...) {
            }
        }
    }

private:
    std::mutex mutex_;
    std::vector<device_deleted> queue_;
    std::function<void(const device_deleted&)> listener_;
};

} // namespace qomem

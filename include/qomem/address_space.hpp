// qomem/address_space.hpp — address spaces: a name, a root region and the
// current flat view.
//
//     auto sys = qomem::make_container(nullptr, "system", qomem::u128_2_64);
//     qomem::address_space memory(*sys, "memory");
//     qomem::address_space dma(*sys, "dma");     // shares memory's flat view
//     memory.view()->lookup(0x1000);
//
// An address space holds a reference (memory_region_ref) to its root and to
// its current flat view, which holds the regions it points into. Address
// spaces whose roots reduce to the same flat-view root (flat_view_root) share
// one flat view object; all address spaces with no flat-view root share one
// empty view. Every commit re-renders each distinct flat-view root once.
//
// Destroy an address space before (or while) the device using it leaves the
// tree — typically in its unrealize step — when the root belongs to that same
// device: the address space's reference on the root would otherwise keep the
// region, and through it the device, alive.
#pragma once

#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/intrusive/list.hpp>

#include <qomem/flat_view.hpp>
#include <qomem/memory_region.hpp>

namespace qomem {

class address_space;

namespace detail {
inline void render_all_address_spaces();
}

class address_space {
public:
    /// Creates an address space rooted at `root` and renders its view (at the
    /// outermost commit when a transaction is open).
    /// Effects: memory_region_ref on `root`; registers the address space.
    address_space(memory_region& root, std::string name);

    /// Unregisters, drops the flat view and the reference to the root (either
    /// may finalize regions no longer used by anything else).
    ~address_space();

    address_space(const address_space&) = delete;
    address_space& operator=(const address_space&) = delete;

    const std::string& name() const noexcept { return name_; }
    memory_region& root() const noexcept { return *root_; }

    /// The current flat view (shared with every address space that has the
    /// same flat-view root).
    const ref_ptr<flat_view>& view() const noexcept { return view_; }

    /// Calls f(address_space&) for every address space, oldest first.
    template <class F>
    static void for_each(F&& f);

private:
    friend void detail::render_all_address_spaces();

    using hook_t = boost::intrusive::list_member_hook<
        boost::intrusive::link_mode<boost::intrusive::safe_link>>;
    struct list_t;
    static list_t& registry() noexcept;
    static const ref_ptr<flat_view>& empty_view() {
        static const ref_ptr<flat_view> v(new flat_view(nullptr, {}));
        return v;
    }

    hook_t hook_;
    std::string name_;
    memory_region* root_;
    ref_ptr<flat_view> view_;
};

struct address_space::list_t
    : boost::intrusive::list<address_space, boost::intrusive::member_hook<
                                                address_space, address_space::hook_t,
                                                &address_space::hook_>> {};

inline address_space::list_t& address_space::registry() noexcept {
    static list_t list;
    return list;
}

template <class F>
void address_space::for_each(F&& f) {
    for (address_space& as : registry()) f(as);
}

inline address_space::address_space(memory_region& root, std::string name)
    : name_(std::move(name)), root_(&root), view_(empty_view()) {
    memory_region_ref(root);
    ++root.as_root_users_;
    registry().push_back(*this);
    auto& core = detail::memory_core::get();
    core.render_all = &detail::render_all_address_spaces;
    core.changed();
}

inline address_space::~address_space() {
    registry().erase(registry().iterator_to(*this));
    --root_->as_root_users_;
    view_.reset();
    memory_region_unref(*root_);
}

inline void detail::render_all_address_spaces() {
    std::unordered_map<memory_region*, ref_ptr<flat_view>> views;
    std::vector<ref_ptr<flat_view>> old;
    for (address_space& as : address_space::registry()) {
        memory_region* physmr = flat_view_root(as.root_);
        ref_ptr<flat_view>& v = views[physmr];
        if (!v) v = physmr ? render_flat_view(physmr) : address_space::empty_view();
        old.push_back(std::exchange(as.view_, v));
    }
    // Dropping the old views may finalize regions, whose detaching marks the
    // topology changed again: memory_core::commit loops until it settles.
    old.clear();
}

} // namespace qomem

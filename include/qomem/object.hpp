// qomem/object.hpp — QOM objects: reference counts, child<> and link<>
// properties, unparent, finalization, canonical paths.
//
// Lifetime in one paragraph. A new object starts with one reference, owned by
// whoever created it (`make<T>()` returns it as a `ref_ptr<T>`). Adding it as a
// child of another object takes a second reference, held by the parent; the
// creator usually drops its own afterwards, leaving the parent as sole owner.
// `unparent(obj)` removes the child property, runs the object's unparent hook
// and drops the parent's reference. When the last reference goes the object
// is finalized: its own properties are released first (children unparented,
// strong links dropped, newest property first), then its destructors run from
// leaf to root, then its free hook deallocates it (no free hook for an object
// living inside another, see `embedded<T>`).
//
//     auto root = qomem::make<qomem::container>();       // ref 1: root handle
//     auto dev  = qomem::make<my_device>();              // ref 1: dev handle
//     root->add_child("dev[*]", *dev);                   // ref 2: + parent's
//     dev.reset();                                       // ref 1: parent's only
//     qomem::unparent(*root->child("dev[0]"));           // ref 0: finalized
//
// Thread-safety: reference counts are atomic (ref relaxed, unref acq_rel), so
// references may be taken and dropped from any thread. The property graph
// (children, links, parents) is mutated by one thread at a time, as under
// QEMU's big lock.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/intrusive/list.hpp>
#include <boost/intrusive_ptr.hpp>

#include <qomem/assert.hpp>
#include <qomem/error.hpp>
#include <qomem/type.hpp>

namespace qomem {

class object;

/// The normal way to hold a reference: an intrusive pointer. `make<T>()`
/// returns one adopting the creation reference.
template <class T>
using ref_ptr = boost::intrusive_ptr<T>;

/// Told about lifetime events, for tracing and teaching. Called on the thread
/// that caused the event; must not throw.
class lifetime_observer {
public:
    /// `obj` lost its last reference; its properties are about to be released
    /// and then its finalizers run. Still fully usable during the call.
    virtual void finalizing(const object& obj) noexcept = 0;
    /// `child` is being removed from `parent` (before its unparent hook runs).
    virtual void unparenting(const object& /*child*/, const object& /*parent*/) noexcept {}

protected:
    ~lifetime_observer() = default;
};

/// Installs the observer (null: none) and returns the previous one.
lifetime_observer* set_lifetime_observer(lifetime_observer* obs) noexcept;

/// Live-object accounting, a debug aid: how many objects of each type exist
/// now (types with none are omitted). Thread-safe.
std::map<std::string, std::size_t, std::less<>> live_objects();
/// Total number of live objects of every type.
std::size_t live_object_count();

enum class link_strength : std::uint8_t {
    weak,   ///< the link does not hold a reference to its target
    strong, ///< the link holds a reference to its target while it points to it
};

/// Base of every QOM object type.
class object {
public:
    using parent_type = void;
    using interface_types = detail::type_list<>;
    using class_type = object_class;
    static constexpr std::string_view type_name = "object";
    static constexpr const type_info& static_type() noexcept {
        return detail::type_holder<object>::info;
    }
    virtual const type_info& type() const noexcept { return static_type(); }

    object(const object&) = delete;
    object& operator=(const object&) = delete;

    // ---- references --------------------------------------------------------

    /// Takes a reference. Complexity: one relaxed atomic increment.
    /// Requires (asserted): the object is not dead (count > 0).
    void ref() {
        const auto old = ref_.fetch_add(1, std::memory_order_relaxed);
        if (old == 0) [[unlikely]] {
            ref_.fetch_sub(1, std::memory_order_relaxed);
            dead_ref_failure("ref");
        }
    }

    /// Drops a reference; dropping the last one finalizes the object (see the
    /// header overview), which may in turn release and finalize its children.
    /// A type may finalize later, on another thread (last_reference_dropped:
    /// a memory region is finalized by its memory system's writer).
    /// Requires (asserted): the count is not already zero; the last reference
    /// is not being dropped while the object still has a parent (the parent's
    /// own reference would then be unbalanced). On a failed check nothing changes.
    void unref() {
        if (drop_ref()) [[unlikely]]
            last_reference_dropped();
    }

    /// The current count (racy by nature when other threads hold references).
    std::uint32_t ref_count() const noexcept { return ref_.load(std::memory_order_relaxed); }

    // ---- the composition tree -------------------------------------------------

    /// The parent, or null for an object that is not a child of anything.
    object* parent() const noexcept { return parent_; }
    /// The name of the child property that holds this object ("" if none).
    std::string_view name() const noexcept;

    /// Adds `child` as a child property named `name` of this object.
    /// `name` ending in "[*]" is auto-numbered: "dev[*]" becomes the first free
    /// of "dev[0]", "dev[1]", ...
    /// Requires (asserted): `child` has no parent and is not this object or one
    /// of its ancestors.
    /// Effects: takes a reference to `child` (held by this object) and sets its
    /// parent. Returns the name actually used.
    /// Throws: property_error if a property of that name exists (nothing changed).
    /// Complexity: O(1) average, plus the numbering probe for "[*]".
    std::string_view add_child(std::string_view name, object& child);

    /// The child named `name`, or null.
    object* child(std::string_view name) const noexcept;

    /// Calls f(object&) for each child, oldest first. `f` must not add or
    /// remove properties of this object.
    template <class F>
    void for_each_child(F&& f) const {
        for (const property& p : props_)
            if (p.kind == property_kind::child) f(*p.target);
    }

    /// Adds a link property `name` pointing to `target` (may be null).
    /// Effects: a strong link takes a reference to `target`.
    /// Throws: property_error if the name is taken (nothing changed).
    void add_link(std::string_view name, object* target, link_strength strength,
                  const type_info& target_type = object::static_type());

    /// Points link `name` at `target`.
    /// Effects: a strong link takes a reference to the new target, then drops
    /// the one to the old target (which may finalize it).
    /// Throws: property_error if there is no such link or `target` is not of the
    /// link's type (nothing changed).
    void set_link(std::string_view name, object* target);

    /// Points link `name` at the object at canonical path `path` (checked
    /// against the link's type, like QEMU's link setter).
    /// Throws: path_error if the path does not resolve or names an object of
    /// the wrong type; property_error if there is no such link.
    void set_link_path(std::string_view name, std::string_view path);

    /// The target of link `name` (null if the link is empty or absent).
    object* link(std::string_view name) const noexcept;

    /// Calls f(name, target, strength) for each link property, oldest first.
    template <class F>
    void for_each_link(F&& f) const {
        for (const property& p : props_)
            if (p.kind == property_kind::link) f(std::string_view(p.name), p.target, p.strength);
    }

    /// True if a property (child or link) called `name` exists.
    bool has_property(std::string_view name) const noexcept { return find(name) != nullptr; }

    /// Deletes property `name` and releases it: a child is unparented (its
    /// unparent hook runs, then this object's reference to it is dropped, which
    /// may finalize it); a strong link drops its reference.
    /// Throws: property_error if there is no such property (nothing changed).
    void delete_property(std::string_view name);

    /// "/machine/peripheral/dev0" when the object's topmost ancestor is a root
    /// container (see container::make_root); std::nullopt otherwise.
    std::optional<std::string> canonical_path() const;

    /// The object at absolute `path` in the tree this object belongs to (the
    /// tree of its topmost ancestor), or null.
    object* resolve_path(std::string_view path) const noexcept;

    /// The topmost ancestor (this object if it has no parent).
    const object& tree_root() const noexcept;
    object& tree_root() noexcept;

protected:
    object() noexcept = default;
    /// Finalizer of the base type: by the time it runs every property has been
    /// released and the object has no parent (both checked in finalize()).
    virtual ~object();

    /// The unparent hook (QEMU's ObjectClass::unparent): runs when this object
    /// is removed from its parent, before the parent's reference is dropped,
    /// while parent() is still set. Overriders call the base version.
    virtual void on_unparent() {}

public:
    /// True for children that leave the tree together with their owner: a
    /// device's unparent hook unparents every child for which this is true
    /// (memory regions, see memory_region.hpp).
    virtual bool follows_owner_out_of_tree() const noexcept { return false; }

protected:

    /// Something to do after the object's storage has been released (QEMU's
    /// `free` hook replaced by a type, e.g. a memory region dropping the
    /// reference it holds on its owner). Queried just before the destructors
    /// run. Must not throw.
    struct after_free_action {
        void (*fn)(object*) = nullptr;
        object* arg = nullptr;
    };
    virtual after_free_action after_free() noexcept { return {}; }
    /// The after_free action that drops one reference to `o` (a held owner).
    static after_free_action unref_after_free(object* o) noexcept {
        return {[](object* x) { x->unref(); }, o};
    }

    /// Drops a reference without finalizing: returns true when it was the
    /// last one. The object is then dead (nothing may take a reference to it)
    /// and must be finalized with finalize_dropped(), now or later.
    /// Requires (asserted): the count is not already zero.
    bool drop_ref() {
        const auto old = ref_.fetch_sub(1, std::memory_order_acq_rel);
        if (old == 0) [[unlikely]] {
            ref_.fetch_add(1, std::memory_order_relaxed);
            dead_ref_failure("unref");
        }
        return old == 1;
    }

    /// Runs the checks of a last unref on an object whose last reference
    /// drop_ref() dropped (check_finalizable and "no parent left"), with the
    /// count put back to one meanwhile: a failed check leaves the object
    /// alive with that one reference, returned to the caller.
    void check_dropped() {
        QOMEM_ASSERT(ref_.load(std::memory_order_relaxed) == 0,
                     "check_dropped on {} at {}, which still has {} reference(s)", type().name,
                     static_cast<const void*>(this), ref_.load(std::memory_order_relaxed));
        ref_.store(1, std::memory_order_relaxed);
        check_last_unref();
        ref_.store(0, std::memory_order_relaxed);
    }

    /// Finalizes an object whose last reference drop_ref() dropped: the
    /// checks of check_dropped(), then finalization.
    void finalize_dropped() {
        check_dropped();
        finalize();
    }

    /// What dropping the last reference does: finalize_dropped() at once. A
    /// type may defer it (a memory region hands it to its system's writer).
    virtual void last_reference_dropped() { finalize_dropped(); }

    /// Misuse checks a type adds for the moment its last reference is
    /// dropped (e.g. a memory region still mapped somewhere). Runs with the
    /// count still at one; a failed QOMEM_ASSERT here leaves the object alive.
    virtual void check_finalizable() const {}

private:
    template <class T, class... Args>
    friend ref_ptr<T> make(Args&&... args);
    template <class T>
    friend class embedded;
    friend void unparent(object& obj);

    enum class property_kind : std::uint8_t { child, link };
    struct property {
        boost::intrusive::list_member_hook<
            boost::intrusive::link_mode<boost::intrusive::safe_link>>
            hook;
        std::string name;
        property_kind kind;
        link_strength strength = link_strength::weak;
        object* target = nullptr;
        const type_info* target_type = nullptr; // links only
    };
    using property_list = boost::intrusive::list<
        property, boost::intrusive::member_hook<property, decltype(property::hook),
                                                &property::hook>>;

    property* find(std::string_view name) const noexcept {
        auto it = index_.find(name);
        return it == index_.end() ? nullptr : it->second;
    }
    std::string unique_name(std::string_view name) const;
    property& insert(std::unique_ptr<property> p);
    std::unique_ptr<property> remove(property& p) noexcept;
    void release(property& p);
    void finalize();
    [[noreturn]] void dead_ref_failure(const char* what) const;
    void check_last_unref() const;

    std::atomic<std::uint32_t> ref_{1};
    object* parent_ = nullptr;
    property* child_prop_ = nullptr; // our property in parent_
    property_list props_;
    std::unordered_map<std::string_view, property*> index_;
    void (*free_)(void*) noexcept = nullptr; // deallocates storage; null if embedded
    void* storage_ = nullptr;
};

// ADL hooks for boost::intrusive_ptr.
inline void intrusive_ptr_add_ref(object* o) { o->ref(); }
inline void intrusive_ptr_release(object* o) { o->unref(); }

/// Removes `obj` from its parent: deletes the child property, runs obj's
/// unparent hook, clears its parent and drops the parent's reference (which
/// may finalize `obj` and, through its hook, whatever it releases).
/// Requires (asserted): `obj` has a parent.
void unparent(object& obj);

namespace detail {
struct live_registry {
    std::mutex mutex;
    std::map<std::string, std::size_t, std::less<>> counts;
    static live_registry& get() {
        static live_registry r;
        return r;
    }
    void add(std::string_view type) {
        std::lock_guard lock(mutex);
        auto it = counts.find(type);
        if (it == counts.end()) it = counts.emplace(std::string(type), 0).first;
        ++it->second;
    }
    void remove(std::string_view type) {
        std::lock_guard lock(mutex);
        auto it = counts.find(type);
        if (it != counts.end() && --it->second == 0) counts.erase(it);
    }
};

inline std::atomic<lifetime_observer*>& observer_slot() noexcept {
    static std::atomic<lifetime_observer*> slot{nullptr};
    return slot;
}

template <class T>
void free_storage(void* p) noexcept {
    ::operator delete(p, std::align_val_t{alignof(T)});
}
} // namespace detail

inline lifetime_observer* set_lifetime_observer(lifetime_observer* obs) noexcept {
    return detail::observer_slot().exchange(obs, std::memory_order_acq_rel);
}

inline std::map<std::string, std::size_t, std::less<>> live_objects() {
    auto& r = detail::live_registry::get();
    std::lock_guard lock(r.mutex);
    return r.counts;
}

inline std::size_t live_object_count() {
    std::size_t n = 0;
    for (const auto& [type, count] : live_objects()) n += count;
    return n;
}

/// Creates a T on the heap (QEMU's object_new): constructors run root to leaf;
/// the result holds the creation reference; the free hook deallocates.
template <class T, class... Args>
ref_ptr<T> make(Args&&... args) {
    static_assert(std::is_base_of_v<object, T>, "qomem::make<T>: T must derive from qomem::object");
    static_assert(std::is_same_v<typename T::parent_type, void> ||
                      std::is_same_v<decltype(T::type_name), decltype(object::type_name)>,
                  "declare T with QOMEM_OBJECT");
    void* mem = ::operator new(sizeof(T), std::align_val_t{alignof(T)});
    T* obj;
    try {
        obj = ::new (mem) T(std::forward<Args>(args)...);
    } catch (...) {
        ::operator delete(mem, std::align_val_t{alignof(T)});
        throw;
    }
    object* base = obj;
    base->free_ = &detail::free_storage<T>;
    base->storage_ = mem;
    detail::live_registry::get().add(T::type_name);
    return ref_ptr<T>(obj, false);
}

/// Storage for an object living inside another (QEMU's object_initialize on a
/// struct member). The object is constructed in place by `init` and has no
/// free hook: finalization runs its destructors and leaves the storage.
/// Requires (asserted): the embedded object has been finalized (or was never
/// initialised) when the storage is destroyed.
template <class T>
class embedded {
public:
    embedded() noexcept = default;
    embedded(const embedded&) = delete;
    embedded& operator=(const embedded&) = delete;
    ~embedded() {
        QOMEM_ASSERT(!live_, "embedded {} destroyed while still alive (ref count {})",
                     T::type_name, get().ref_count());
    }

    /// Constructs the object in place with one reference (the caller's).
    /// Requires (asserted): not already initialised and alive.
    template <class... Args>
    T& init(Args&&... args) {
        QOMEM_ASSERT(!live_, "embedded {} initialised twice", T::type_name);
        T* obj = ::new (static_cast<void*>(buf_)) T(std::forward<Args>(args)...);
        static_cast<object*>(obj)->storage_ = buf_;
        static_cast<object*>(obj)->free_ = &embedded::mark_dead;
        live_ = true;
        detail::live_registry::get().add(T::type_name);
        return *obj;
    }
    T& get() noexcept { return *std::launder(reinterpret_cast<T*>(buf_)); }
    const T& get() const noexcept { return *std::launder(reinterpret_cast<const T*>(buf_)); }
    T* operator->() noexcept { return &get(); }
    bool alive() const noexcept { return live_; }

private:
    static void mark_dead(void* storage) noexcept {
        // storage is buf_, the first member: recover the holder.
        reinterpret_cast<embedded*>(storage)->live_ = false;
    }
    alignas(T) std::byte buf_[sizeof(T)];
    bool live_ = false;
};

/// A plain object that only groups children (QEMU's "container" type). The
/// topmost container of a tree made with make_root() is the "/" of
/// canonical paths.
class container : public object {
    QOMEM_OBJECT(container, "container", object)
public:
    container() noexcept = default;
    /// A container that is the root "/" of canonical paths.
    static ref_ptr<container> make_root() {
        auto r = make<container>();
        r->is_root_ = true;
        return r;
    }
    bool is_root() const noexcept { return is_root_; }

private:
    bool is_root_ = false;
};

// ---- casts ------------------------------------------------------------------

/// QEMU's object_dynamic_cast: `obj` as a T (an object type or an interface),
/// or null when it is not one.
template <class T>
T* dynamic_cast_to(object* obj) noexcept {
    if (!obj) return nullptr;
    const type_info& t = T::static_type();
    if constexpr (std::is_base_of_v<object, T>) {
        return obj->type().is_a(t) ? static_cast<T*>(obj) : nullptr;
    } else {
        const interface_entry* e = obj->type().find_interface(t);
        return e ? static_cast<T*>(e->cast(obj)) : nullptr;
    }
}
template <class T>
const T* dynamic_cast_to(const object* obj) noexcept {
    return dynamic_cast_to<T>(const_cast<object*>(obj));
}

/// QEMU's OBJECT_CHECK, always checked: a mismatch is reported as misuse
/// through the assertion handler.
template <class T>
T& cast(object& obj) {
    T* r = dynamic_cast_to<T>(&obj);
    QOMEM_ASSERT(r, "object {} of type {} is not an instance of type {}",
                 static_cast<const void*>(&obj), obj.type().name, T::type_name);
    return *r;
}
template <class T>
const T& cast(const object& obj) {
    return cast<T>(const_cast<object&>(obj));
}

// ---- implementation ---------------------------------------------------------

inline object::~object() {
    // finalize() has released every property; an object destroyed any other
    // way (e.g. on the stack) is a misuse we cannot report from a destructor,
    // so drop what is left to keep the intrusive hooks consistent.
    while (!props_.empty()) {
        auto owned = remove(props_.back());
        object* t = owned->target;
        if (owned->kind == property_kind::child) {
            t->parent_ = nullptr;
            t->child_prop_ = nullptr;
            t->unref();
        } else if (owned->strength == link_strength::strong && t) {
            t->unref();
        }
    }
}

inline std::string_view object::name() const noexcept {
    return child_prop_ ? std::string_view(child_prop_->name) : std::string_view{};
}

inline std::string object::unique_name(std::string_view name) const {
    constexpr std::string_view star = "[*]";
    if (name.size() < star.size() || name.substr(name.size() - star.size()) != star)
        return std::string(name);
    const std::string_view stem = name.substr(0, name.size() - star.size());
    for (std::size_t i = 0;; ++i) {
        std::string candidate = fmt::format("{}[{}]", stem, i);
        if (!find(candidate)) return candidate;
    }
}

inline object::property& object::insert(std::unique_ptr<property> p) {
    if (find(p->name))
        throw property_error(fmt::format("object of type {} already has a property named '{}'",
                                         type().name, p->name));
    property& ref = *p;
    index_.emplace(std::string_view(ref.name), &ref);
    props_.push_back(*p.release());
    return ref;
}

inline std::unique_ptr<object::property> object::remove(property& p) noexcept {
    index_.erase(std::string_view(p.name));
    props_.erase(props_.iterator_to(p));
    return std::unique_ptr<property>(&p);
}

inline std::string_view object::add_child(std::string_view name, object& child) {
    QOMEM_ASSERT(!child.parent_,
                 "cannot add {} as child '{}' of {}: it already has parent {} (as '{}')",
                 child.type().name, name, type().name, child.parent_ ? child.parent_->type().name : "",
                 child.name());
    for (const object* a = this; a; a = a->parent_)
        QOMEM_ASSERT(a != &child, "cannot add {} as child '{}' of its own descendant",
                     child.type().name, name);
    auto p = std::make_unique<property>();
    p->name = unique_name(name);
    p->kind = property_kind::child;
    p->target = &child;
    child.ref(); // asserts on a dead child: nothing changed yet
    property* inserted = nullptr;
    try {
        inserted = &insert(std::move(p));
    } catch (...) {
        child.unref(); // not the last: the child was alive before the ref
        throw;
    }
    property& ins = *inserted;
    child.parent_ = this;
    child.child_prop_ = &ins;
    return ins.name;
}

inline object* object::child(std::string_view name) const noexcept {
    const property* p = find(name);
    return p && p->kind == property_kind::child ? p->target : nullptr;
}

inline void object::add_link(std::string_view name, object* target, link_strength strength,
                             const type_info& target_type) {
    if (target && !target->type().is_a(target_type) && !target->type().find_interface(target_type))
        throw property_error(fmt::format("link '{}' of {} wants a {}, got a {}", name,
                                         type().name, target_type.name, target->type().name));
    auto p = std::make_unique<property>();
    p->name = std::string(name);
    p->kind = property_kind::link;
    p->strength = strength;
    p->target = target;
    p->target_type = &target_type;
    const bool holds = target && strength == link_strength::strong;
    if (holds) target->ref(); // asserts on a dead target: nothing changed yet
    try {
        insert(std::move(p));
    } catch (...) {
        if (holds) target->unref(); // not the last: the caller's target was alive
        throw;
    }
}

inline void object::set_link(std::string_view name, object* target) {
    property* p = find(name);
    if (!p || p->kind != property_kind::link)
        throw property_error(fmt::format("{} has no link property named '{}'", type().name, name));
    if (target && !target->type().is_a(*p->target_type) &&
        !target->type().find_interface(*p->target_type))
        throw property_error(fmt::format("link '{}' of {} wants a {}, got a {}", name,
                                         type().name, p->target_type->name, target->type().name));
    const bool strong = p->strength == link_strength::strong;
    if (strong && target) target->ref(); // asserts on a dead target: nothing changed yet
    object* old = std::exchange(p->target, target);
    if (strong && old) old->unref();
}

inline void object::set_link_path(std::string_view name, std::string_view path) {
    object* target = resolve_path(path);
    if (!target) throw path_error(fmt::format("path '{}' does not resolve", path));
    const property* p = find(name);
    if (p && p->kind == property_kind::link && !target->type().is_a(*p->target_type) &&
        !target->type().find_interface(*p->target_type))
        throw path_error(fmt::format("path '{}' names a {}, but link '{}' wants a {}", path,
                                     target->type().name, name, p->target_type->name));
    set_link(name, target);
}

inline object* object::link(std::string_view name) const noexcept {
    const property* p = find(name);
    return p && p->kind == property_kind::link ? p->target : nullptr;
}

inline void object::release(property& p) {
    if (p.kind == property_kind::child) {
        object& child = *p.target;
        if (lifetime_observer* obs = detail::observer_slot().load(std::memory_order_acquire))
            obs->unparenting(child, *this);
        try {
            child.on_unparent();
        } catch (...) {
            // The property is already gone: finish the removal so the child
            // is not left pointing at it, then report the hook's failure.
            child.parent_ = nullptr;
            child.child_prop_ = nullptr;
            child.unref();
            throw;
        }
        child.parent_ = nullptr;
        child.child_prop_ = nullptr;
        child.unref();
    } else if (p.strength == link_strength::strong && p.target) {
        p.target->unref();
    }
}

inline void object::delete_property(std::string_view name) {
    property* p = find(name);
    if (!p)
        throw property_error(fmt::format("{} has no property named '{}'", type().name, name));
    auto owned = remove(*p);
    release(*owned);
}

inline void unparent(object& obj) {
    QOMEM_ASSERT(obj.parent_, "unparent of an orphan: {} at {} has no parent", obj.type().name,
                 static_cast<const void*>(&obj));
    object& parent = *obj.parent_;
    auto owned = parent.remove(*obj.child_prop_);
    parent.release(*owned);
}

inline void object::finalize() {
    if (lifetime_observer* obs = detail::observer_slot().load(std::memory_order_acquire))
        obs->finalizing(*this);
    // Release newest first, re-reading the list each time: a release may run
    // hooks that delete other properties of this very object (QEMU's
    // check-qom-proplist "delchild" case).
    while (!props_.empty()) {
        auto owned = remove(props_.back());
        release(*owned);
    }
    QOMEM_ASSERT(!parent_, "finalizing {} while it still has parent {}", type().name,
                 parent_->type().name);
    const after_free_action post = after_free();
    void (*free_fn)(void*) noexcept = free_;
    void* storage = storage_;
    const std::string_view dying_type = type().name; // static storage
    this->~object();
    detail::live_registry::get().remove(dying_type);
    if (free_fn) free_fn(storage);
    if (post.fn) post.fn(post.arg);
}

inline void object::dead_ref_failure(const char* what) const {
    QOMEM_ASSERT(false, "{} of a dead object: {} at {} has no references left", what,
                 type().name, static_cast<const void*>(this));
    std::abort();
}

inline void object::check_last_unref() const {
    QOMEM_ASSERT(!parent_,
                 "last reference to {} dropped while it is still child '{}' of {}: "
                 "unbalanced unref (the parent's reference was dropped by someone else)",
                 type().name, name(), parent_ ? parent_->type().name : "");
    check_finalizable();
}

inline const object& object::tree_root() const noexcept {
    const object* o = this;
    while (o->parent_) o = o->parent_;
    return *o;
}
inline object& object::tree_root() noexcept {
    return const_cast<object&>(static_cast<const object*>(this)->tree_root());
}

inline std::optional<std::string> object::canonical_path() const {
    const object& top = tree_root();
    const auto* root = dynamic_cast_to<container>(&top);
    if (!root || !root->is_root()) return std::nullopt;
    if (this == &top) return std::string("/");
    std::vector<std::string_view> parts;
    for (const object* o = this; o->parent_; o = o->parent_) parts.push_back(o->name());
    std::string path;
    for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        path += '/';
        path += *it;
    }
    return path;
}

inline object* object::resolve_path(std::string_view path) const noexcept {
    if (path.empty() || path.front() != '/') return nullptr;
    const object* o = &tree_root();
    std::size_t pos = 1;
    while (pos < path.size()) {
        std::size_t end = path.find('/', pos);
        if (end == std::string_view::npos) end = path.size();
        const std::string_view part = path.substr(pos, end - pos);
        if (!part.empty()) {
            o = o->child(part);
            if (!o) return nullptr;
        }
        pos = end + 1;
    }
    return const_cast<object*>(o);
}

} // namespace qomem

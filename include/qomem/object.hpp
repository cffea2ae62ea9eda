// qomem/object.hpp — QOM objects: reference counts, properties (child<>,
// link<> and typed values), unparent, finalization, and paths.
//
// Lifetime in one paragraph. A new object starts with one reference, owned by
// whoever created it (`make<T>()` returns it as a `ref_ptr<T>`). Adding it as a
// child of another object takes a second reference, held by the parent; the
// creator usually drops its own afterwards, leaving the parent as sole owner.
// `unparent(obj)` removes the child property, runs the object's unparent hook
// and drops the parent's reference (an object without a parent is left alone,
// as QEMU's object_unparent does). When the last reference goes the object is
// finalized: its own properties are released first (children unparented,
// strong links dropped, newest property first), then its destructors run from
// leaf to root, then its free hook deallocates it (no free hook for an object
// living inside another, see `embedded<T>`).
//
//     auto root = qomem::container::make_root();       // ref 1: root handle
//     auto dev  = qomem::make<my_device>();              // ref 1: dev handle
//     root->add_child("dev[*]", *dev);                   // ref 2: + parent's
//     dev.reset();                                       // ref 1: parent's only
//     qomem::unparent(*root->child("dev[0]"));           // ref 0: finalized
//
// Finalization always completes. A property released during finalization
// stays findable until the finalization ends (a hook may delete it again:
// that is a no-op, QEMU's "delchild" case, in whatever order the properties
// were added); an unparent hook that throws while its parent is being
// finalized does not stop it: the rest of the properties are released, the
// destructors and the free hook run, and the first exception is then handed
// to the finalization error handler (set_finalization_error_handler; by
// default it is printed to stderr). Finalization never throws, so dropping a
// reference from a destructor (a ref_ptr's) is always safe. Outside
// finalization, `unparent(obj)` and `delete_property(name)` complete the
// removal even when obj's hook throws, and then rethrow the hook's exception.
//
// Typed properties (property.hpp) are got, set, parsed and printed by name,
// whether the class declared them or the object added them; iterating an
// object's properties reports each one's QEMU type name ("bool", "size",
// "child<container>", "link<device>", ...). Paths resolve as QEMU's
// object_resolve_path does: absolute, partial (a unique suffix, with an
// ambiguity flag), typed, relative to an object, through links — in the tree
// of whatever object they start from, rooted or not.
//
// Thread-safety: reference counts are atomic (ref relaxed, unref acq_rel), so
// references may be taken and dropped from any thread. The property graph
// (children, links, parents, values) is mutated by one thread at a time, as
// under QEMU's big lock.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
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
#include <qomem/property.hpp>
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

/// An exception that a hook threw while an object was being finalized (see
/// the header overview): finalization went on, and reports it afterwards.
struct finalization_error {
    std::string_view type;    ///< the type name of the object whose finalization caught it
    std::exception_ptr error; ///< the first exception caught during that finalization
};

/// Receives finalization errors, after the object is freed. Must not throw.
using finalization_error_handler = void (*)(const finalization_error&) noexcept;

/// The default handler: one line on stderr.
inline void default_finalization_error_handler(const finalization_error& e) noexcept {
    std::string what = "an exception that is not a std::exception";
    try {
        std::rethrow_exception(e.error);
    } catch (const std::exception& x) {
        what = x.what();
    } catch (...) {
    }
    std::fprintf(stderr,
                 "qomem: a hook threw while a %.*s was being finalized (finalization "
                 "completed): %s\n",
                 static_cast<int>(e.type.size()), e.type.data(), what.c_str());
}

/// Installs `handler` (null: the default) and returns the previous one.
/// Thread-safe.
finalization_error_handler
set_finalization_error_handler(finalization_error_handler handler) noexcept;

/// Installs a finalization error handler for its lifetime (RAII for tests).
class scoped_finalization_error_handler {
public:
    explicit scoped_finalization_error_handler(finalization_error_handler h) noexcept
        : previous_(set_finalization_error_handler(h)) {}
    ~scoped_finalization_error_handler() { set_finalization_error_handler(previous_); }
    scoped_finalization_error_handler(const scoped_finalization_error_handler&) = delete;
    scoped_finalization_error_handler& operator=(const scoped_finalization_error_handler&) = delete;

private:
    finalization_error_handler previous_;
};

/// Live-object accounting, a debug aid: how many objects of each type exist
/// now (types with none are omitted). Thread-safe.
std::map<std::string, std::size_t, std::less<>> live_objects();
/// Total number of live objects of every type.
std::size_t live_object_count();

enum class link_strength : std::uint8_t {
    weak,   ///< the link does not hold a reference to its target
    strong, ///< the link holds a reference to its target while it points to it
};

namespace detail {
template <class T>
void complete_init(T& obj);
} // namespace detail

/// Base of every QOM object type.
class object {
public:
    using qomem_declared_type = object;
    using parent_type = void;
    using interface_types = detail::type_list<>;
    using class_type = object_class;
    static constexpr bool qomem_abstract = true;
    static constexpr std::string_view type_name = "object";
    static constexpr const type_info& static_type() noexcept {
        return detail::type_holder<object>::info;
    }
    virtual const type_info& type() const noexcept { return static_type(); }
    /// The class object of this object's type (QEMU's object_get_class).
    const object_class& get_class() const { return type().class_fn(); }

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
    /// own reference would then be unbalanced). On a failed check nothing
    /// changes. Throws: only through the assertion handler (finalization
    /// itself never throws).
    void unref() {
        if (drop_ref()) [[unlikely]]
            last_reference_dropped();
    }

    /// The current count (racy by nature when other threads hold references;
    /// for a memory region in the tree, a snapshot of its per-thread parts).
    std::uint32_t ref_count() const noexcept {
        return static_cast<std::uint32_t>(ref_.load(std::memory_order_relaxed) +
                                          distributed_refs());
    }

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
    /// Throws: property_error if a property of that name exists, an instance
    /// or a class one (nothing changed).
    /// Complexity: O(1) average, plus the numbering probe for "[*]".
    std::string_view add_child(std::string_view name, object& child);

    /// The child named `name`, or null.
    object* child(std::string_view name) const noexcept;

    /// Calls f(object&) for each child, oldest first. `f` must not add or
    /// remove properties of this object.
    template <class F>
    void for_each_child(F&& f) const {
        for (const property& p : props_)
            if (p.kind == role::child) f(*p.target);
    }

    /// Adds a link property `name` pointing to `target` (may be null), whose
    /// targets must be of `target_type` (an object type or an interface).
    /// Effects: a strong link takes a reference to `target`.
    /// Throws: property_error if the name is taken or `target` is not of
    /// `target_type` (nothing changed).
    void add_link(std::string_view name, object* target, link_strength strength,
                  const type_info& target_type = object::static_type());

    /// Points link `name` at `target`.
    /// Effects: a strong link takes a reference to the new target, then drops
    /// the one to the old target (which may finalize it).
    /// Throws: property_error if there is no such link or `target` is not of the
    /// link's type (nothing changed).
    void set_link(std::string_view name, object* target);

    /// Points link `name` at the object `path` names, resolved as QEMU's link
    /// setter does: in this object's tree, absolute or partial, typed with the
    /// link's type; "" empties the link.
    /// Effects: as set_link.
    /// Throws: property_error if there is no such link; path_error if the path
    /// names nothing, names several objects (a partial path), or names an
    /// object of the wrong type (nothing changed in each case).
    void set_link_path(std::string_view name, std::string_view path);

    /// The target of link `name` (null if the link is empty or absent).
    object* link(std::string_view name) const noexcept;

    /// Calls f(name, target, strength) for each link property, oldest first.
    template <class F>
    void for_each_link(F&& f) const {
        for (const property& p : props_)
            if (p.kind == role::link) f(std::string_view(p.name), p.target, p.strength);
    }

    /// True if a property called `name` exists: a child, a link, a typed
    /// property of this object or of its class.
    bool has_property(std::string_view name) const noexcept;

    /// Deletes this object's property `name` and releases it: a child is
    /// unparented (its unparent hook runs, then this object's reference to it
    /// is dropped, which may finalize it); a strong link drops its reference.
    /// A property already released by this object's finalization is removed
    /// without being released again.
    /// Throws: property_error if there is no such property or it belongs to
    /// the class (nothing changed); what the child's unparent hook throws,
    /// after the removal completed.
    void delete_property(std::string_view name);

    /// "/machine/peripheral/dev0" when the object's topmost ancestor is a root
    /// container (see container::make_root); std::nullopt otherwise.
    std::optional<std::string> canonical_path() const;

    /// The path from the topmost ancestor ("/" for that ancestor itself): the
    /// canonical path in a rooted tree, and the path that resolve_path and
    /// set_link_path accept in any tree.
    std::string path_in_tree() const;

    /// The object at absolute `path` in the tree this object belongs to (the
    /// tree of its topmost ancestor), following child and link properties,
    /// or null. (For partial, typed and relative paths see the free
    /// functions resolve_path, resolve_path_type and resolve_path_at.)
    object* resolve_path(std::string_view path) const noexcept;

    /// The topmost ancestor (this object if it has no parent).
    const object& tree_root() const noexcept;
    object& tree_root() noexcept;

    // ---- typed properties (property.hpp) --------------------------------------

    /// Adds a typed property to this object alone (QEMU's
    /// object_property_add_*), and applies its default if it has one.
    /// Requires (asserted): `def` works on this object's type (or an ancestor).
    /// Effects: the setter runs once for the default. References: none.
    /// Throws: property_error if the name is taken by an instance or class
    /// property; what the setter throws for the default (nothing changed).
    /// Complexity: O(1) average plus a scan of the class's properties (as
    /// every lookup by name that misses the object's own properties).
    void add_property(property_def def);

    /// What iteration reports for property `name`, or nullopt if none.
    std::optional<property_info> find_property(std::string_view name) const;

    /// Calls f(const property_info&) for each property: the class's (root
    /// type's first, each class's in the order added), then the object's own
    /// (oldest first: children, links and typed properties).
    template <class F>
    void for_each_property(F&& f) const {
        for (const property_def& d : get_class().properties()) f(d.info(true));
        for (const property& p : props_) f(info_of(p));
    }

    /// Sets the description of this object's own property `name` (QEMU's
    /// object_property_set_description). Throws: property_error if it has
    /// no such property of its own.
    void set_property_description(std::string_view name, std::string text);

    /// Typed getters. get_int: signed integers; get_uint: unsigned integers
    /// and sizes; get_str: strings, an enum's value name, a link's target
    /// path ("" when empty) and a child's path; get_enum: the value index of
    /// an enumeration whose type name is `enum_type`.
    /// Throws: property_error when there is no such property or it is of
    /// another type (for get_enum, another enum type).
    bool get_bool(std::string_view name) const;
    std::int64_t get_int(std::string_view name) const;
    std::uint64_t get_uint(std::string_view name) const;
    std::string get_str(std::string_view name) const;
    int get_enum(std::string_view name, std::string_view enum_type) const;

    /// Typed setters, each checked before the setter runs. set_str also sets
    /// an enumeration by value name and a link by path (as set_link_path).
    /// Effects: the property's setter (for a link: set_link's references;
    /// for "realized": realize or unrealize).
    /// Throws: property_error when there is no such property, it is read-only
    /// or of another type; property_value_error for a value out of range or
    /// an unknown enum value; path_error as set_link_path; what the setter
    /// throws (a refused realize, say). Nothing changed on a refusal.
    /// Complexity: a lookup by name (see add_property) plus the setter.
    void set_bool(std::string_view name, bool value);
    void set_int(std::string_view name, std::int64_t value);
    void set_uint(std::string_view name, std::uint64_t value);
    void set_str(std::string_view name, std::string_view value);

    /// Sets property `name` from text (QEMU's object_property_parse): see
    /// property.hpp for each type's syntax; a link takes a path.
    /// Throws: as the setters; property_value_error names the property and
    /// the text.
    void parse_property(std::string_view name, std::string_view text);

    /// Property `name` as text (QEMU's object_property_print); what
    /// parse_property reads back. Throws: property_error if there is none.
    std::string print_property(std::string_view name) const;

protected:
    object() noexcept = default;
    /// Finalizer of the base type: by the time it runs every property has been
    /// released and the object has no parent (both checked in finalize()).
    inline virtual ~object();

    /// The unparent hook (QEMU's ObjectClass::unparent): runs when this object
    /// is removed from its parent, before the parent's reference is dropped,
    /// while parent() is still set. Overriders call the base version.
    virtual void on_unparent() {}

public:
    /// True for children that leave the tree together with their owner: a
    /// device's unparent hook unparents every child for which this is true
    /// (memory regions, see memory_region.hpp).
    virtual bool follows_owner_out_of_tree() const noexcept { return false; }

    /// For such a follower, still a child of `owner`: true while something
    /// other than `owner` and its other followers that are still its children
    /// holds a reference to it (a container or alias of another owner, an
    /// address space, a flat view, a DMA mapping, a ref_ptr kept anywhere).
    /// Read when the owner's last reference goes (see last_reference_dropped).
    virtual bool held_beyond_owner(const object& owner) const noexcept {
        (void)owner;
        return false;
    }

protected:
    /// For a follower whose owner is being destroyed without finalization (an
    /// exception thrown by the owner's constructor after it made and placed
    /// the follower): let nothing reach the owner through it any more.
    /// Runs from ~object(); must not throw.
    virtual void owner_destroyed_unfinalized(const object& owner) noexcept { (void)owner; }

public:
    /// The "type" class property every object has (QEMU's).
    static void class_init(object_class& k, type_tag<object>);

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
        if (old == 1) [[unlikely]]
            dropped_ = true;
        return old == 1;
    }

    /// Runs the checks of a last unref on an object whose last reference
    /// drop_ref() dropped (check_finalizable and "no parent left"), with the
    /// count put back to one meanwhile: a failed check leaves the object
    /// alive with that one reference, returned to the caller.
    void check_dropped() {
        QOMEM_ASSERT(dropped_ && ref_.load(std::memory_order_relaxed) == 0,
                     "check_dropped on {} at {} whose last reference drop_ref() did not drop "
                     "(count {})",
                     type().name, static_cast<const void*>(this),
                     ref_.load(std::memory_order_relaxed));
        ref_.store(1, std::memory_order_relaxed);
        check_last_unref();
        ref_.store(0, std::memory_order_relaxed);
    }

    /// Finalizes an object whose last reference drop_ref() dropped: the
    /// checks of check_dropped(), then finalization.
    /// Requires (asserted): drop_ref() returned true for this object and it
    /// has not been finalized since.
    void finalize_dropped() {
        check_dropped();
        dropped_ = false;
        finalize();
    }

    /// What dropping the last reference does. The rule for owners (any
    /// object, in the tree or not, device or not): when an owner's last
    /// reference goes while some of its followers (its memory regions) are
    /// held beyond it (held_beyond_owner), all its followers are unparented
    /// first — as a device's unparent hook does — so each one still held
    /// holds a reference to the owner until it is freed (the others are
    /// freed at once); the owner is finalized when the last of them goes.
    /// Otherwise, finalize_dropped() at once. A type may defer
    /// finalization instead (a memory region hands it to its system's writer).
    /// Effects: may unparent followers (each then references this object).
    virtual void last_reference_dropped() {
        if (!hand_over_to_followers()) finalize_dropped();
    }

    /// The first half of the owners' rule above: unparents the followers held
    /// beyond this object, each taking a reference to it, and returns true
    /// if this object is alive again (then it is not finalized now).
    /// Requires: drop_ref() just dropped the last reference. Never throws: a
    /// hook's exception goes to the finalization error handler.
    bool hand_over_to_followers() noexcept;

    /// Misuse checks a type adds for the moment its last reference is
    /// dropped (e.g. a memory region still mapped somewhere). Runs with the
    /// count still at one; a failed QOMEM_ASSERT here leaves the object alive.
    virtual void check_finalizable() const {}

    /// References a type counts outside the atomic count (a memory region in
    /// the tree counts per thread: detail/region_refcount.hpp); ref_count()
    /// adds them.
    virtual std::int64_t distributed_refs() const noexcept { return 0; }

    /// Folds `by` references counted elsewhere into the atomic count (a
    /// region leaving per-thread counting), as one atomic add.
    /// Requires (asserted): the count stays above zero (a lower sum means
    /// more unrefs than refs: the count is left as it was).
    void fold_refs(std::int64_t by) {
        // A CAS loop, so that the check comes before the change (other
        // threads may ref and unref meanwhile through ref_ptr).
        std::uint32_t old = ref_.load(std::memory_order_relaxed);
        for (;;) {
            const std::int64_t now = std::int64_t(old) + by;
            QOMEM_ASSERT(now >= 1 && now <= std::int64_t(UINT32_MAX),
                         "unbalanced reference count on {} at {}: {} after folding {}", type().name,
                         static_cast<const void*>(this), now, by);
            // acq_rel, as drop_ref: the folded unrefs release what their
            // threads did to the object to whoever drops the last reference.
            if (ref_.compare_exchange_weak(old, static_cast<std::uint32_t>(now),
                                           std::memory_order_acq_rel, std::memory_order_relaxed))
                return;
        }
    }

private:
    template <class T, class... Args>
    requires ObjectType<T> &&(!T::qomem_abstract) friend ref_ptr<T> make(Args&&... args);
    template <ObjectType T>
    friend class embedded;
    friend void unparent(object& obj);
    friend struct detail::type_hooks;

    enum class role : std::uint8_t { child, link, value };
    struct property {
        // normal_link: Boost's safe_link checks are BOOST_ASSERTs, which
        // -DNDEBUG removes; `linked` is our own check, never compiled out.
        boost::intrusive::list_member_hook<
            boost::intrusive::link_mode<boost::intrusive::normal_link>>
            hook;
        bool linked = false;
        bool released = false; // by the owner's finalization, kept findable until it ends
        role kind = role::value;
        link_strength strength = link_strength::weak;
        std::string name;
        std::string description;
        object* target = nullptr;
        const type_info* target_type = nullptr; // links only
        std::unique_ptr<property_def> def;      // typed properties only

        property() = default;
        property(const property&) = delete;
        property& operator=(const property&) = delete;
        ~property() {
            QOMEM_ASSERT(!linked, "property '{}' destroyed while still in its object's list", name);
        }
    };
    using property_list = boost::intrusive::list<
        property,
        boost::intrusive::member_hook<property, decltype(property::hook), &property::hook>>;

    property* find(std::string_view name) const noexcept {
        auto it = index_.find(name);
        return it == index_.end() ? nullptr : it->second;
    }
    /// A property that has not been released (what getters see).
    property* find_live(std::string_view name) const noexcept {
        property* p = find(name);
        return p && !p->released ? p : nullptr;
    }
    const property_def* find_class_property(std::string_view name) const noexcept {
        return get_class().find_property(name);
    }
    /// The typed property `name` (instance or class), or a property_error.
    const property_def& value_def(std::string_view name) const;
    property_info info_of(const property& p) const;
    std::string unique_name(std::string_view name) const;
    property& insert(std::unique_ptr<property> p);
    std::unique_ptr<property> remove(property& p) noexcept;
    void release(property& p);
    void set_checked(std::string_view name, const property_value& v);
    void finalize() noexcept;
    [[noreturn]] void dead_ref_failure(const char* what) const;
    void check_last_unref() const;

    std::atomic<std::uint32_t> ref_{1};
    bool dropped_ = false;     // drop_ref() dropped the last reference; finalize_dropped() due
    bool unparenting_ = false; // our unparent hook is running
    object* parent_ = nullptr;
    property* child_prop_ = nullptr; // our property in parent_
    property_list props_;            // oldest first
    property_list released_;         // released by finalization, not yet removed
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
/// An object without a parent — never added, already unparented, or whose
/// own unparent hook is running — is left alone: QEMU's object_unparent is a
/// no-op there too, so error paths may unparent unconditionally.
/// Throws: what obj's unparent hook throws, after the removal completed.
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

inline std::atomic<finalization_error_handler>& finalization_handler_slot() noexcept {
    static std::atomic<finalization_error_handler> slot{&default_finalization_error_handler};
    return slot;
}

template <class T>
void free_storage(void* p) noexcept {
    ::operator delete (p, std::align_val_t{alignof(T)});
}

/// QEMU's id_wellformed (device and object ids): a letter, then letters,
/// digits, '-', '.', '_'.
inline bool id_wellformed(std::string_view id) noexcept {
    auto alpha = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); };
    if (id.empty() || !alpha(id.front())) return false;
    for (char c : id)
        if (!alpha(c) && !(c >= '0' && c <= '9') && c != '-' && c != '.' && c != '_') return false;
    return true;
}

/// Runs each step, keeps the first exception, and rethrows it at the end:
/// for hooks that must finish their work even when one step throws.
class first_error {
public:
    template <class F>
    void run(F&& f) noexcept {
        try {
            f();
        } catch (...) {
            if (!error_) error_ = std::current_exception();
        }
    }
    void rethrow() const {
        if (error_) std::rethrow_exception(error_);
    }
    /// Hands the first exception (if any) to the finalization error handler.
    void report_to_finalization_handler(std::string_view type) const noexcept {
        if (error_) finalization_handler_slot().load(std::memory_order_acquire)({type, error_});
    }

private:
    std::exception_ptr error_;
};
} // namespace detail

inline lifetime_observer* set_lifetime_observer(lifetime_observer* obs) noexcept {
    return detail::observer_slot().exchange(obs, std::memory_order_acq_rel);
}

inline finalization_error_handler
set_finalization_error_handler(finalization_error_handler handler) noexcept {
    return detail::finalization_handler_slot().exchange(
        handler ? handler : &default_finalization_error_handler, std::memory_order_acq_rel);
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
/// then the class properties' defaults are applied and the instance_post_init
/// hooks run, leaf to root. The result holds the creation reference; the free
/// hook deallocates.
/// Requires (compile time): T is declared with QOMEM_OBJECT (not abstract).
/// Throws: what a constructor, a default's setter or a post-init hook throws;
/// the object is then finalized (or, for a constructor, never was one).
template <class T, class... Args>
requires ObjectType<T> &&(!T::qomem_abstract)ref_ptr<T> make(Args&&... args) {
    void* mem = ::operator new (sizeof(T), std::align_val_t{alignof(T)});
    T* obj;
    try {
        obj = ::new (mem) T(std::forward<Args>(args)...);
    } catch (...) {
        ::operator delete (mem, std::align_val_t{alignof(T)});
        throw;
    }
    object* base = obj;
    base->free_ = &detail::free_storage<T>;
    base->storage_ = mem;
    detail::live_registry::get().add(T::type_name);
    ref_ptr<T> r(obj, false);
    detail::complete_init(*obj); // on a throw, r's release finalizes it
    return r;
}

template <class T>
object* detail::create_instance() {
    return make<T>().detach();
}

/// Storage for an object living inside another (QEMU's object_initialize on a
/// struct member). The object is constructed in place by `init` and has no
/// free hook: finalization runs its destructors and leaves the storage.
/// Requires (asserted): the embedded object has been finalized (or was never
/// initialised) when the storage is destroyed.
template <ObjectType T>
class embedded {
    static_assert(!T::qomem_abstract, "embedded<T>: T is an abstract type");

public:
    embedded() noexcept = default;
    embedded(const embedded&) = delete;
    embedded& operator=(const embedded&) = delete;
    ~embedded() {
        QOMEM_ASSERT(!live_, "embedded {} destroyed while still alive (ref count {})", T::type_name,
                     get().ref_count());
    }

    /// Constructs the object in place with one reference (the caller's),
    /// then applies class defaults and runs the post-init hooks, as make<T>.
    /// Requires (asserted): not already initialised and alive.
    /// Throws: as make<T>; the object is then finalized.
    template <class... Args>
    T& init(Args&&... args) {
        QOMEM_ASSERT(!live_, "embedded {} initialised twice", T::type_name);
        T* obj = ::new (static_cast<void*>(buf_)) T(std::forward<Args>(args)...);
        static_cast<object*>(obj)->storage_ = buf_;
        static_cast<object*>(obj)->free_ = &embedded::mark_dead;
        live_ = true;
        detail::live_registry::get().add(T::type_name);
        try {
            detail::complete_init(*obj);
        } catch (...) {
            obj->unref();
            throw;
        }
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
template <QomType T>
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
template <QomType T>
const T* dynamic_cast_to(const object* obj) noexcept {
    return dynamic_cast_to<T>(const_cast<object*>(obj));
}

/// QEMU's OBJECT_CHECK, always checked: a mismatch is reported as misuse
/// through the assertion handler.
template <QomType T>
T& cast(object& obj) {
    T* r = dynamic_cast_to<T>(&obj);
    QOMEM_ASSERT(r, "object {} of type {} is not an instance of type {}",
                 static_cast<const void*>(&obj), obj.type().name, T::type_name);
    return *r;
}
template <QomType T>
const T& cast(const object& obj) {
    return cast<T>(const_cast<object&>(obj));
}

/// The class object of interface I for `obj`'s type (QEMU's
/// INTERFACE_GET_CLASS), or null if its type does not implement I.
template <InterfaceType I>
const auto* interface_class_of(const object& obj) {
    return interface_class_of<I>(obj.get_class());
}

// ---- paths (QEMU's object_resolve_path family) ----------------------------------

/// The object that property `part` of `parent` leads to: a child, or a
/// link's target (null for an empty link); null for anything else.
object* resolve_path_component(const object& parent, std::string_view part) noexcept;

/// QEMU's object_resolve_path_type, in the tree of `in_tree` (from its
/// topmost ancestor, rooted or not). An absolute path ("/a/b", empty parts
/// skipped) follows children and links from the top and names the object if
/// it is of `type`. Any other path is partial: it names the object of `type`
/// that the path reaches from some object of the tree; "" names every object
/// of `type`. When several objects match (also one object reached twice,
/// through a child and through a link, as in QEMU) the result is null and
/// `*ambiguous` is set; it is cleared otherwise.
/// Complexity: O(depth of the path) absolute; O(objects in the tree × depth)
/// partial.
object* resolve_path_type(const object& in_tree, std::string_view path, const type_info& type,
                          bool* ambiguous = nullptr);
template <QomType T>
T* resolve_path_type(const object& in_tree, std::string_view path, bool* ambiguous = nullptr) {
    return dynamic_cast_to<T>(resolve_path_type(in_tree, path, T::static_type(), ambiguous));
}

/// QEMU's object_resolve_path: resolve_path_type for any object type.
object* resolve_path(const object& in_tree, std::string_view path, bool* ambiguous = nullptr);

/// QEMU's object_resolve_path_at: `path` relative to `from` ("a/b" follows
/// properties of `from`), or absolute in from's tree when it starts with '/'.
/// No partial matching. Null when it names nothing.
object* resolve_path_at(const object& from, std::string_view path) noexcept;

// ---- implementation ---------------------------------------------------------

namespace detail {
/// The rest of QEMU's object_initialize after instance_init: class property
/// defaults, then instance_post_init leaf to root. On a throw, an object
/// that a hook parented is unparented again, so the creation reference is
/// the last one.
template <class T>
void complete_init(T& obj) {
    try {
        for (const property_def& d : class_of<T>().properties())
            if (d.default_value() && d.writable()) d.set(obj, *d.default_value());
        type_hooks::post_init<T>(obj);
    } catch (...) {
        try {
            unparent(obj);
        } catch (...) {
        }
        throw;
    }
}
} // namespace detail

inline void object::class_init(object_class& k, type_tag<object>) {
    k.add_property(string_property<object>("type", [](const object& o) {
                       return std::string(o.type().name);
                   }).describe("the object's type name"));
}

inline object::~object() {
    // finalize() has released every property; an object destroyed any other
    // way (e.g. on the stack) is a misuse we cannot report from a destructor,
    // so drop what is left to keep the lists consistent.
    while (!released_.empty()) remove(released_.back());
    while (!props_.empty()) {
        auto owned = remove(props_.back());
        object* t = owned->target;
        if (owned->kind == role::child) {
            if (t->follows_owner_out_of_tree()) t->owner_destroyed_unfinalized(*this);
            t->parent_ = nullptr;
            t->child_prop_ = nullptr;
            t->unref();
        } else if (owned->kind == role::link && owned->strength == link_strength::strong && t) {
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
        if (!find(candidate) && !find_class_property(candidate)) return candidate;
    }
}

inline object::property& object::insert(std::unique_ptr<property> p) {
    if (find(p->name) || find_class_property(p->name))
        throw property_error(fmt::format("object of type {} already has a property named '{}'",
                                         type().name, p->name));
    QOMEM_ASSERT(!p->linked, "property '{}' inserted twice", p->name);
    property& ref = *p;
    index_.emplace(std::string_view(ref.name), &ref);
    props_.push_back(*p.release());
    ref.linked = true;
    return ref;
}

inline std::unique_ptr<object::property> object::remove(property& p) noexcept {
    index_.erase(std::string_view(p.name));
    property_list& list = p.released ? released_ : props_;
    list.erase(list.iterator_to(p));
    p.linked = false;
    return std::unique_ptr<property>(&p);
}

inline std::string_view object::add_child(std::string_view name, object& child) {
    QOMEM_ASSERT(!child.parent_,
                 "cannot add {} as child '{}' of {}: it already has parent {} (as '{}')",
                 child.type().name, name, type().name,
                 child.parent_ ? child.parent_->type().name : "", child.name());
    for (const object* a = this; a; a = a->parent_)
        QOMEM_ASSERT(a != &child, "cannot add {} as child '{}' of its own descendant",
                     child.type().name, name);
    auto p = std::make_unique<property>();
    p->name = unique_name(name);
    p->kind = role::child;
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
    const property* p = find_live(name);
    return p && p->kind == role::child ? p->target : nullptr;
}

namespace detail {
/// The one link type check: `target` (non-null) may be the target of a link
/// typed `want`. Returns the refusal message, empty when accepted.
inline std::string link_refusal(const object& holder, std::string_view link, const object& target,
                                const type_info& want) {
    if (target.type().conforms_to(want)) return {};
    return fmt::format("link '{}' of {} wants a {}, got a {}", link, holder.type().name, want.name,
                       target.type().name);
}
} // namespace detail

inline void object::add_link(std::string_view name, object* target, link_strength strength,
                             const type_info& target_type) {
    if (target) {
        if (std::string why = detail::link_refusal(*this, name, *target, target_type); !why.empty())
            throw property_error(why);
    }
    auto p = std::make_unique<property>();
    p->name = std::string(name);
    p->kind = role::link;
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
    property* p = find_live(name);
    if (!p || p->kind != role::link)
        throw property_error(fmt::format("{} has no link property named '{}'", type().name, name));
    if (target) {
        if (std::string why = detail::link_refusal(*this, name, *target, *p->target_type);
            !why.empty())
            throw property_error(why);
    }
    const bool strong = p->strength == link_strength::strong;
    if (strong && target) target->ref(); // asserts on a dead target: nothing changed yet
    object* old = std::exchange(p->target, target);
    if (strong && old) old->unref();
}

inline void object::set_link_path(std::string_view name, std::string_view path) {
    const property* p = find_live(name);
    if (!p || p->kind != role::link)
        throw property_error(fmt::format("{} has no link property named '{}'", type().name, name));
    if (path.empty()) {
        set_link(name, nullptr);
        return;
    }
    bool ambiguous = false;
    object* target = qomem::resolve_path_type(*this, path, *p->target_type, &ambiguous);
    if (!target) {
        if (ambiguous)
            throw path_error(fmt::format("path '{}' does not uniquely identify an object", path));
        bool any_ambiguous = false;
        if (object* other = qomem::resolve_path(*this, path, &any_ambiguous))
            throw path_error(fmt::format("path '{}' names a {}, but link '{}' wants a {}", path,
                                         other->type().name, name, p->target_type->name));
        if (any_ambiguous)
            throw path_error(fmt::format("path '{}' names no {} for link '{}' (and several other "
                                         "objects)",
                                         path, p->target_type->name, name));
        throw path_error(fmt::format("path '{}' does not resolve", path));
    }
    set_link(name, target);
}

inline object* object::link(std::string_view name) const noexcept {
    const property* p = find_live(name);
    return p && p->kind == role::link ? p->target : nullptr;
}

inline bool object::has_property(std::string_view name) const noexcept {
    return find_live(name) != nullptr || find_class_property(name) != nullptr;
}

inline void object::release(property& p) {
    if (p.kind == role::child) {
        object& child = *p.target;
        if (lifetime_observer* obs = detail::observer_slot().load(std::memory_order_acquire))
            obs->unparenting(child, *this);
        std::exception_ptr hook_error;
        child.unparenting_ = true;
        try {
            child.on_unparent();
        } catch (...) {
            // Finish the removal so the child is not left pointing at a
            // property that is gone, then report the hook's failure.
            hook_error = std::current_exception();
        }
        child.unparenting_ = false;
        child.parent_ = nullptr;
        child.child_prop_ = nullptr;
        child.unref();
        if (hook_error) std::rethrow_exception(hook_error);
    } else if (p.kind == role::link && p.strength == link_strength::strong && p.target) {
        p.target->unref();
    }
}

inline void object::delete_property(std::string_view name) {
    property* p = find(name);
    if (!p) {
        if (find_class_property(name))
            throw property_error(fmt::format("property '{}' belongs to the class {}: it cannot be "
                                             "deleted from one object",
                                             name, type().name));
        throw property_error(fmt::format("{} has no property named '{}'", type().name, name));
    }
    if (p->released) {
        remove(*p); // released by our finalization already: nothing more to do
        return;
    }
    auto owned = remove(*p);
    release(*owned);
}

inline void unparent(object& obj) {
    if (!obj.parent_ || obj.unparenting_) return; // QEMU's object_unparent checks the parent too
    object& parent = *obj.parent_;
    auto owned = parent.remove(*obj.child_prop_);
    parent.release(*owned);
}

inline void object::finalize() noexcept {
    if (lifetime_observer* obs = detail::observer_slot().load(std::memory_order_acquire))
        obs->finalizing(*this);
    // Release newest first. A released property stays findable (in
    // released_) until the end, so a hook may delete it again in any order
    // (QEMU's check-qom-proplist "delchild" case); one that adds or deletes
    // unreleased properties is seen by the next turn of the loop. A hook
    // that throws does not stop the loop.
    std::exception_ptr first;
    while (!props_.empty()) {
        property& p = props_.back();
        props_.erase(props_.iterator_to(p));
        released_.push_back(p);
        p.released = true;
        try {
            release(p);
        } catch (...) {
            if (!first) first = std::current_exception();
        }
    }
    while (!released_.empty()) remove(released_.back());
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
    if (first)
        detail::finalization_handler_slot().load(std::memory_order_acquire)({dying_type, first});
}

inline bool object::hand_over_to_followers() noexcept {
    bool any_held = false;
    for (const property& p : props_)
        if (p.kind == role::child && p.target->follows_owner_out_of_tree() &&
            p.target->held_beyond_owner(*this)) {
            any_held = true;
            break;
        }
    if (!any_held) return false;
    // Then every follower leaves, as a device's unparent hook has them do:
    // one left in the tree could hold, directly or through regions of
    // others, one that now holds the owner (a cycle). Those nothing else
    // holds are freed as they leave, releasing what they held.
    std::vector<object*> followers;
    try {
        for (const property& p : props_)
            if (p.kind == role::child && p.target->follows_owner_out_of_tree())
                followers.push_back(p.target);
    } catch (...) { // only the allocation can throw: then finalize as before
        return false;
    }
    // Nothing can reach a dead object, so bringing it back is ours alone: a
    // reference of our own while the followers take theirs.
    ref_.store(1, std::memory_order_relaxed);
    dropped_ = false;
    detail::first_error errors;
    for (object* f : followers) errors.run([&] { unparent(*f); });
    errors.report_to_finalization_handler(type().name);
    unref(); // ours: what the followers hold keeps the object alive
    return true;
}

inline void object::dead_ref_failure(const char* what) const {
    QOMEM_ASSERT(false, "{} of a dead object: {} at {} has no references left", what, type().name,
                 static_cast<const void*>(this));
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

inline std::string object::path_in_tree() const {
    if (!parent_) return "/";
    std::vector<std::string_view> parts;
    for (const object* o = this; o->parent_; o = o->parent_) parts.push_back(o->name());
    std::string path;
    for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        path += '/';
        path += *it;
    }
    return path;
}

inline std::optional<std::string> object::canonical_path() const {
    const auto* root = dynamic_cast_to<container>(&tree_root());
    if (!root || !root->is_root()) return std::nullopt;
    return path_in_tree();
}

inline object* object::resolve_path(std::string_view path) const noexcept {
    if (path.empty() || path.front() != '/') return nullptr;
    return resolve_path_at(*this, path);
}

// ---- typed properties ------------------------------------------------------------

inline void object::add_property(property_def def) {
    QOMEM_ASSERT(type().is_a(def.owner_type()), "property '{}' of {} cannot be added to a {}",
                 def.name(), def.owner_type().name, type().name);
    auto p = std::make_unique<property>();
    p->name = def.name();
    p->kind = role::value;
    p->def = std::make_unique<property_def>(std::move(def));
    const property_def& d = *p->def;
    property& ins = insert(std::move(p));
    if (d.default_value() && d.writable()) {
        try {
            d.set(*this, *d.default_value());
        } catch (...) {
            remove(ins); // the unique_ptr drops it: as before the call
            throw;
        }
    }
}

inline property_info object::info_of(const property& p) const {
    property_info i;
    if (p.kind == role::value) {
        i = p.def->info(false);
    } else {
        i.name = p.name;
        i.kind = p.kind == role::child ? property_kind::child : property_kind::link;
        i.type = p.kind == role::child ? fmt::format("child<{}>", p.target->type().name)
                                       : fmt::format("link<{}>", p.target_type->name);
        i.writable = p.kind == role::link;
        i.description = p.description;
    }
    if (p.kind == role::value && !p.description.empty()) i.description = p.description;
    return i;
}

inline std::optional<property_info> object::find_property(std::string_view name) const {
    if (const property* p = find_live(name)) return info_of(*p);
    if (const property_def* d = find_class_property(name)) return d->info(true);
    return std::nullopt;
}

inline void object::set_property_description(std::string_view name, std::string text) {
    property* p = find_live(name);
    if (!p)
        throw property_error(
            fmt::format("{} has no property of its own named '{}'", type().name, name));
    p->description = std::move(text);
}

inline const property_def& object::value_def(std::string_view name) const {
    if (const property* p = find_live(name)) {
        if (p->kind == role::value) return *p->def;
        throw property_error(fmt::format("property '{}' of {} is a {}, not a value", name,
                                         type().name, info_of(*p).type));
    }
    if (const property_def* d = find_class_property(name)) return *d;
    throw property_error(fmt::format("{} has no property named '{}'", type().name, name));
}

namespace detail {
inline property_error wrong_kind(const object& o, std::string_view name, std::string_view type,
                                 std::string_view wanted) {
    return property_error(fmt::format("property '{}' of {} is of type {}, not {}", name,
                                      o.type().name, type, wanted));
}
} // namespace detail

inline bool object::get_bool(std::string_view name) const {
    const property_def& d = value_def(name);
    if (d.kind() != property_kind::boolean)
        throw detail::wrong_kind(*this, name, d.type_name(), "bool");
    return std::get<bool>(d.get(*this));
}

inline std::int64_t object::get_int(std::string_view name) const {
    const property_def& d = value_def(name);
    if (d.kind() != property_kind::signed_integer)
        throw detail::wrong_kind(*this, name, d.type_name(), "a signed integer");
    return std::get<std::int64_t>(d.get(*this));
}

inline std::uint64_t object::get_uint(std::string_view name) const {
    const property_def& d = value_def(name);
    if (d.kind() != property_kind::unsigned_integer && d.kind() != property_kind::size)
        throw detail::wrong_kind(*this, name, d.type_name(), "an unsigned integer or size");
    return std::get<std::uint64_t>(d.get(*this));
}

inline std::string object::get_str(std::string_view name) const {
    if (const property* p = find_live(name); p && p->kind != role::value)
        return print_property(name);
    const property_def& d = value_def(name);
    if (d.kind() != property_kind::string && d.kind() != property_kind::enumeration)
        throw detail::wrong_kind(*this, name, d.type_name(), "a string");
    return d.print(d.get(*this));
}

inline int object::get_enum(std::string_view name, std::string_view enum_type) const {
    const property_def& d = value_def(name);
    if (d.kind() != property_kind::enumeration || d.type_name() != enum_type)
        throw detail::wrong_kind(*this, name, d.type_name(), enum_type);
    return static_cast<int>(std::get<std::int64_t>(d.get(*this)));
}

inline void object::set_checked(std::string_view name, const property_value& v) {
    const property_def& d = value_def(name);
    if (!d.writable())
        throw property_error(fmt::format("property '{}' of {} is read-only", name, type().name));
    d.check(v);
    d.set(*this, v);
}

inline void object::set_bool(std::string_view name, bool value) { set_checked(name, value); }
inline void object::set_int(std::string_view name, std::int64_t value) { set_checked(name, value); }
inline void object::set_uint(std::string_view name, std::uint64_t value) {
    set_checked(name, value);
}

inline void object::set_str(std::string_view name, std::string_view value) {
    if (const property* p = find_live(name); p && p->kind != role::value) {
        parse_property(name, value);
        return;
    }
    const property_def& d = value_def(name);
    if (d.kind() == property_kind::enumeration) {
        set_checked(name, d.parse(value));
        return;
    }
    set_checked(name, std::string(value));
}

inline void object::parse_property(std::string_view name, std::string_view text) {
    if (const property* p = find_live(name); p && p->kind != role::value) {
        if (p->kind == role::child)
            throw property_error(
                fmt::format("property '{}' of {} is a child<>: read-only", name, type().name));
        set_link_path(name, text);
        return;
    }
    const property_def& d = value_def(name);
    if (!d.writable())
        throw property_error(fmt::format("property '{}' of {} is read-only", name, type().name));
    set_checked(name, d.parse(text));
}

inline std::string object::print_property(std::string_view name) const {
    if (const property* p = find_live(name); p && p->kind != role::value)
        return p->target ? p->target->path_in_tree() : std::string();
    const property_def& d = value_def(name);
    return d.print(d.get(*this));
}

// ---- paths --------------------------------------------------------------------------

namespace detail {
/// g_strsplit(path, "/"): "" has no parts, "a/" has two.
inline std::vector<std::string_view> split_path(std::string_view path) {
    std::vector<std::string_view> parts;
    if (path.empty()) return parts;
    std::size_t pos = 0;
    for (;;) {
        const std::size_t slash = path.find('/', pos);
        parts.push_back(path.substr(pos, slash - pos));
        if (slash == std::string_view::npos) break;
        pos = slash + 1;
    }
    return parts;
}

inline const object* resolve_absolute(const object* o, std::span<const std::string_view> parts,
                                      const type_info& type) noexcept {
    for (std::string_view part : parts) {
        if (part.empty()) continue;
        o = resolve_path_component(*o, part);
        if (!o) return nullptr;
    }
    return o->type().conforms_to(type) ? o : nullptr;
}

inline const object* resolve_partial(const object& node, std::span<const std::string_view> parts,
                                     const type_info& type, bool& ambiguous) noexcept {
    const object* found = resolve_absolute(&node, parts, type);
    const object* result = found;
    node.for_each_child([&](const object& c) {
        if (ambiguous) return;
        if (const object* f = resolve_partial(c, parts, type, ambiguous)) {
            if (result) {
                ambiguous = true;
                return;
            }
            result = f;
        }
    });
    return ambiguous ? nullptr : result;
}
} // namespace detail

inline object* resolve_path_component(const object& parent, std::string_view part) noexcept {
    if (object* c = parent.child(part)) return c;
    return parent.link(part);
}

inline object* resolve_path_type(const object& in_tree, std::string_view path,
                                 const type_info& type, bool* ambiguous) {
    const auto parts = detail::split_path(path);
    const object& top = in_tree.tree_root();
    bool ambig = false;
    const object* found;
    if (!parts.empty() && parts.front().empty())
        found = detail::resolve_absolute(&top, std::span(parts).subspan(1), type);
    else
        found = detail::resolve_partial(top, parts, type, ambig);
    if (ambiguous) *ambiguous = ambig;
    return const_cast<object*>(found);
}

inline object* resolve_path(const object& in_tree, std::string_view path, bool* ambiguous) {
    return resolve_path_type(in_tree, path, object::static_type(), ambiguous);
}

inline object* resolve_path_at(const object& from, std::string_view path) noexcept {
    try {
        const auto parts = detail::split_path(path);
        const object* start = &from;
        std::span<const std::string_view> rest(parts);
        if (!path.empty() && path.front() == '/') start = &from.tree_root();
        return const_cast<object*>(detail::resolve_absolute(start, rest, object::static_type()));
    } catch (const std::bad_alloc&) {
        return nullptr;
    }
}

} // namespace qomem

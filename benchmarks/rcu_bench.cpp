// RCU: qomem/rcu.hpp against Debian's liburcu (0.13, the urcu-memb flavour:
// membarrier(2), like ours), in the same binary, for issue 11's decision.
//
//   rcu/read_pair/{qomem,liburcu,liburcu_calls}[/threads:N]
//       read_lock + read_unlock around one acquire load of a published
//       pointer; N threads at once (no writer). liburcu: its inline read
//       side (_LGPL_SOURCE, for LGPL-compatible code only); liburcu_calls:
//       its exported functions, what an MIT program such as qomem may use
//   rcu/synchronize_idle/{qomem,liburcu}
//       a grace period with one other reader thread registered and outside
//   rcu/synchronize_busy/{qomem,liburcu}
//       a grace period while another thread runs short read sections back
//       to back; counter reader_sections_per_s
//   rcu/blocked_reader/{qomem,liburcu}/waiting:{0,1}
//       a reader sleeps 20 ms inside a read section while a second reader
//       runs short sections; waiting:1 has the benchmark thread call
//       synchronize meanwhile, waiting:0 only waits for the sleeper (the
//       baseline). Counters: writer_cpu_per_wait_us (CPU the waiting thread
//       used per grace period), reader_sections_per_s (the second reader's
//       throughput: compare waiting:1 against waiting:0)
//   rcu/retire/{qomem,liburcu}
//       hand one object to the reclaimer: qomem's retire (stamp, reclaim
//       what is safe on this thread, one membarrier when another reader is
//       registered) against liburcu's call_rcu (enqueue for its callback
//       thread; the callbacks run there, not counted here). Both allocate
//       the object and free it in the callback.
//
// liburcu's readers register explicitly, ours on first use.
// Real (wall-clock) time throughout: the grace periods wait. QOMEM_BENCH_SMOKE=1
// (CI) shortens the blocked reader to 2 ms and two iterations.
#define _LGPL_SOURCE 1
#include <urcu/urcu-memb.h>

// The read side a program that is not LGPL-compatible must use: liburcu's
// exported functions, a call each (urcu-memb.h maps the names to the inline
// versions under _LGPL_SOURCE; those stay reachable as _urcu_memb_*).
#undef urcu_memb_read_lock
#undef urcu_memb_read_unlock
extern "C" {
void urcu_memb_read_lock(void);
void urcu_memb_read_unlock(void);
}

#include <pthread.h>
#include <time.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <latch>
#include <thread>

#include <benchmark/benchmark.h>

#include <qomem/rcu.hpp>

namespace {

struct qomem_rcu {
    static void register_thread() {}
    static void unregister_thread() {}
    static void lock() { qomem::rcu::read_lock(); }
    static void unlock() { qomem::rcu::read_unlock(); }
    static void synchronize() { qomem::rcu::synchronize(); }
    static void retire(void* p, void (*fn)(void*)) { qomem::rcu::retire(p, fn); }
    static void drain() { qomem::rcu::synchronize(); }
};

struct liburcu {
    static void register_thread() { urcu_memb_register_thread(); }
    static void unregister_thread() { urcu_memb_unregister_thread(); }
    static void lock() { _urcu_memb_read_lock(); }
    static void unlock() { _urcu_memb_read_unlock(); }
    static void synchronize() { urcu_memb_synchronize_rcu(); }
    static void drain() { urcu_memb_barrier(); }
};

/// liburcu with the out-of-line read side (read_pair only).
struct liburcu_calls {
    static void register_thread() { urcu_memb_register_thread(); }
    static void unregister_thread() { urcu_memb_unregister_thread(); }
    static void lock() { urcu_memb_read_lock(); }
    static void unlock() { urcu_memb_read_unlock(); }
};

/// What the readers read.
int shared_value = 42;
std::atomic<int*> shared{&shared_value};

template <class Rcu>
void read_section() {
    Rcu::lock();
    benchmark::DoNotOptimize(*shared.load(std::memory_order_acquire));
    Rcu::unlock();
}

/// A thread that registers with `Rcu` and then runs `body` until told to stop.
template <class Rcu>
class helper {
public:
    template <class F>
    explicit helper(F body) : t_([this, body] {
        Rcu::register_thread();
        started_.count_down();
        body(stop_);
        Rcu::unregister_thread();
    }) {
        started_.wait();
    }
    ~helper() {
        stop_.store(true);
        t_.join();
    }
    helper(const helper&) = delete;
    helper& operator=(const helper&) = delete;

private:
    std::atomic<bool> stop_{false};
    std::latch started_{1};
    std::thread t_;
};

double thread_cpu_seconds() {
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

template <class Rcu>
void read_pair(benchmark::State& state) {
    Rcu::register_thread();
    for (auto _ : state) read_section<Rcu>();
    Rcu::unregister_thread();
    state.SetItemsProcessed(state.iterations());
}

template <class Rcu>
void synchronize_idle(benchmark::State& state) {
    Rcu::register_thread(); // the writer reads too, as in qomem
    {
        read_section<Rcu>();
        helper<Rcu> idle([](std::atomic<bool>& stop) {
            read_section<Rcu>();
            while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        });
        for (auto _ : state) Rcu::synchronize();
    }
    Rcu::unregister_thread();
}

template <class Rcu>
void synchronize_busy(benchmark::State& state) {
    Rcu::register_thread();
    std::atomic<std::uint64_t> sections{0};
    double seconds = 0;
    std::uint64_t n = 0;
    {
        helper<Rcu> busy([&](std::atomic<bool>& stop) {
            std::uint64_t local = 0;
            while (!stop.load(std::memory_order_relaxed)) {
                read_section<Rcu>();
                if (++local % 256 == 0) sections.store(local, std::memory_order_relaxed);
            }
        });
        const auto t0 = std::chrono::steady_clock::now();
        const std::uint64_t s0 = sections.load();
        for (auto _ : state) Rcu::synchronize();
        n = sections.load() - s0;
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    Rcu::unregister_thread();
    state.counters["reader_sections_per_s"] = static_cast<double>(n) / seconds;
}

template <class Rcu>
void blocked_reader(benchmark::State& state) {
    const bool waiting = state.range(0) != 0;
    const bool smoke = std::getenv("QOMEM_BENCH_SMOKE") != nullptr;
    const auto hold = std::chrono::milliseconds(smoke ? 2 : 20);
    Rcu::register_thread();
    std::atomic<std::uint64_t> sections{0};
    double writer_cpu = 0, reader_time = 0;
    std::uint64_t reader_sections = 0;
    {
        helper<Rcu> busy([&](std::atomic<bool>& stop) {
            std::uint64_t local = 0;
            while (!stop.load(std::memory_order_relaxed)) {
                read_section<Rcu>();
                if (++local % 256 == 0) sections.store(local, std::memory_order_relaxed);
            }
        });
        for (auto _ : state) {
            std::latch inside{1};
            std::atomic<bool> left{false};
            std::thread sleeper([&] {
                Rcu::register_thread();
                Rcu::lock();
                inside.count_down();
                std::this_thread::sleep_for(hold);
                Rcu::unlock();
                left.store(true);
                Rcu::unregister_thread();
            });
            inside.wait();
            const auto t0 = std::chrono::steady_clock::now();
            const std::uint64_t s0 = sections.load();
            const double c0 = thread_cpu_seconds();
            if (waiting)
                Rcu::synchronize();
            else
                sleeper.join();
            const double c1 = thread_cpu_seconds();
            const std::uint64_t s1 = sections.load();
            const double wall =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (sleeper.joinable()) sleeper.join();
            state.SetIterationTime(wall);
            writer_cpu += c1 - c0;
            reader_sections += s1 - s0;
            reader_time += wall;
            if (!left.load()) state.SkipWithError("synchronize returned before the reader left");
        }
    }
    Rcu::unregister_thread();
    state.counters["writer_cpu_per_wait_us"] =
        writer_cpu * 1e6 / static_cast<double>(state.iterations());
    state.counters["reader_sections_per_s"] = static_cast<double>(reader_sections) / reader_time;
}

/// The object both retire benchmarks allocate and free (liburcu's call_rcu
/// needs its rcu_head inside the object).
struct urcu_node {
    rcu_head head;
};
void free_node(rcu_head* h) { delete reinterpret_cast<urcu_node*>(h); }

void qomem_retire(benchmark::State& state) {
    {
        read_section<qomem_rcu>();
        helper<qomem_rcu> idle([](std::atomic<bool>& stop) {
            read_section<qomem_rcu>();
            while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        });
        for (auto _ : state)
            qomem::rcu::retire(new urcu_node, [](void* p) { delete static_cast<urcu_node*>(p); });
        qomem::rcu::synchronize();
    }
    state.SetItemsProcessed(state.iterations());
}

void liburcu_retire(benchmark::State& state) {
    urcu_memb_register_thread();
    {
        read_section<liburcu>();
        helper<liburcu> idle([](std::atomic<bool>& stop) {
            read_section<liburcu>();
            while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        });
        for (auto _ : state) urcu_memb_call_rcu(&(new urcu_node)->head, &free_node);
        urcu_memb_barrier();
    }
    urcu_memb_unregister_thread();
    state.SetItemsProcessed(state.iterations());
}

} // namespace

BENCHMARK_TEMPLATE(read_pair, qomem_rcu)->Name("rcu/read_pair/qomem")->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK_TEMPLATE(read_pair, liburcu)->Name("rcu/read_pair/liburcu")->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK_TEMPLATE(read_pair, liburcu_calls)->Name("rcu/read_pair/liburcu_calls")->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK_TEMPLATE(synchronize_idle, qomem_rcu)->Name("rcu/synchronize_idle/qomem")->UseRealTime();
BENCHMARK_TEMPLATE(synchronize_idle, liburcu)->Name("rcu/synchronize_idle/liburcu")->UseRealTime();
BENCHMARK_TEMPLATE(synchronize_busy, qomem_rcu)->Name("rcu/synchronize_busy/qomem")->UseRealTime();
BENCHMARK_TEMPLATE(synchronize_busy, liburcu)->Name("rcu/synchronize_busy/liburcu")->UseRealTime();
BENCHMARK_TEMPLATE(blocked_reader, qomem_rcu)
    ->Name("rcu/blocked_reader/qomem")->ArgName("waiting")->Arg(0)->Arg(1)
    ->Iterations(std::getenv("QOMEM_BENCH_SMOKE") ? 2 : 25)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(blocked_reader, liburcu)
    ->Name("rcu/blocked_reader/liburcu")->ArgName("waiting")->Arg(0)->Arg(1)
    ->Iterations(std::getenv("QOMEM_BENCH_SMOKE") ? 2 : 25)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(qomem_retire)->Name("rcu/retire/qomem")->UseRealTime();
BENCHMARK(liburcu_retire)->Name("rcu/retire/liburcu")->UseRealTime();

BENCHMARK_MAIN();

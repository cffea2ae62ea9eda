// tools/mtree/qemu.hpp — talking to a QEMU: a QMP client over a Unix socket,
// and a QEMU process started from a command line, stopped by its pid.
//
// Every wait has a deadline: connecting, reading a reply, QEMU quitting. A
// QEMU that does not quit in time is killed (SIGKILL to its pid) and reaped.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

extern char** environ;

namespace mtree_tool {

/// Something went wrong talking to QEMU (the message says what and where).
class capture_error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

using steady = std::chrono::steady_clock;

/// A QMP connection (one JSON object per line in each direction).
class qmp_client {
public:
    /// Connects to `socket_path`, retrying until `deadline` (QEMU creates
    /// the socket some time after it starts), reads the greeting and
    /// negotiates capabilities. `alive` (if set) is asked between retries
    /// and stops them when it returns false.
    qmp_client(const std::string& socket_path, steady::time_point deadline,
               const std::function<bool()>& alive = {})
        : deadline_(deadline) {
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        if (socket_path.size() >= sizeof addr.sun_path)
            throw capture_error(fmt::format("QMP socket path too long: {}", socket_path));
        std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
        for (;;) {
            fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd_ < 0) throw capture_error(fmt::format("socket: {}", std::strerror(errno)));
            if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) break;
            const int err = errno;
            ::close(fd_);
            fd_ = -1;
            if (alive && !alive()) throw capture_error("QEMU exited before its QMP socket accepted a connection");
            if (steady::now() >= deadline_)
                throw capture_error(fmt::format("could not connect to {} before the deadline: {}",
                                                socket_path, std::strerror(err)));
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        const nlohmann::json greeting = read_message();
        if (!greeting.contains("QMP"))
            throw capture_error(fmt::format("expected the QMP greeting, got {}", greeting.dump()));
        command("qmp_capabilities");
    }
    ~qmp_client() {
        if (fd_ >= 0) ::close(fd_);
    }
    qmp_client(const qmp_client&) = delete;
    qmp_client& operator=(const qmp_client&) = delete;

    void set_deadline(steady::time_point d) { deadline_ = d; }

    /// Runs a QMP command; returns its "return" value. Events are skipped.
    nlohmann::json command(const std::string& name, const nlohmann::json& args = nullptr) {
        nlohmann::json msg{{"execute", name}};
        if (!args.is_null()) msg["arguments"] = args;
        send(msg.dump() + "\n");
        for (;;) {
            nlohmann::json reply = read_message();
            if (reply.contains("return")) return reply["return"];
            if (reply.contains("error"))
                throw capture_error(fmt::format("QMP {} failed: {}", name, reply["error"].dump()));
        }
    }

    /// Runs an HMP command (human-monitor-command); returns its text.
    std::string hmp(const std::string& command_line) {
        const nlohmann::json r = command("human-monitor-command", {{"command-line", command_line}});
        if (!r.is_string()) throw capture_error(fmt::format("HMP {}: expected text, got {}", command_line, r.dump()));
        return r.get<std::string>();
    }

    /// Sends `quit` and waits (until the deadline) for its reply or for QEMU
    /// to close the connection: closing first may make QEMU drop the command.
    void quit() {
        try {
            command("quit");
        } catch (const capture_error&) {
            // closed before replying, or no reply in time: the caller waits
            // for the process and kills it if it is still there
        }
    }

private:
    void send(const std::string& s) {
        std::size_t done = 0;
        while (done < s.size()) {
            const ssize_t n = ::send(fd_, s.data() + done, s.size() - done, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR) continue;
                throw capture_error(fmt::format("QMP send: {}", std::strerror(errno)));
            }
            done += static_cast<std::size_t>(n);
        }
    }

    nlohmann::json read_message() {
        for (;;) {
            const std::size_t nl = buf_.find('\n');
            if (nl != std::string::npos) {
                std::string line = buf_.substr(0, nl);
                buf_.erase(0, nl + 1);
                if (line.find_first_not_of(" \r\t") == std::string::npos) continue;
                nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
                if (j.is_discarded()) throw capture_error(fmt::format("QMP sent something that is not JSON: {}", line));
                return j;
            }
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - steady::now());
            if (left.count() <= 0) throw capture_error("QEMU did not answer before the deadline");
            pollfd p{fd_, POLLIN, 0};
            const int r = ::poll(&p, 1, static_cast<int>(std::min<long long>(left.count(), 1000)));
            if (r < 0 && errno != EINTR) throw capture_error(fmt::format("poll: {}", std::strerror(errno)));
            if (r <= 0) continue;
            char chunk[65536];
            const ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
            if (n == 0) throw capture_error("QEMU closed the QMP connection");
            if (n < 0) {
                if (errno == EINTR) continue;
                throw capture_error(fmt::format("QMP recv: {}", std::strerror(errno)));
            }
            buf_.append(chunk, static_cast<std::size_t>(n));
        }
    }

    int fd_ = -1;
    std::string buf_;
    steady::time_point deadline_;
};

/// A QEMU started by us. The destructor makes sure it is gone: SIGKILL to
/// its pid if it still runs, then waitpid.
class qemu_process {
public:
    /// Starts `argv` (argv[0] looked up in PATH) with stdin from /dev/null
    /// and stdout and stderr to `log`.
    qemu_process(const std::vector<std::string>& argv, const std::filesystem::path& log) : log_(log) {
        std::vector<char*> args;
        for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        posix_spawn_file_actions_adddup2(&fa, 1, 2);
        const int rc = ::posix_spawnp(&pid_, args[0], &fa, nullptr, args.data(), environ);
        posix_spawn_file_actions_destroy(&fa);
        if (rc != 0) throw capture_error(fmt::format("cannot start {}: {}", argv[0], std::strerror(rc)));
    }
    ~qemu_process() { stop(steady::now()); }
    qemu_process(const qemu_process&) = delete;
    qemu_process& operator=(const qemu_process&) = delete;

    pid_t pid() const noexcept { return pid_; }

    /// True while the process has not exited.
    bool running() {
        if (pid_ <= 0) return false;
        int status = 0;
        const pid_t r = ::waitpid(pid_, &status, WNOHANG);
        if (r == pid_) {
            status_ = status;
            pid_ = -1;
            return false;
        }
        return true;
    }

    /// Waits until `deadline` for the process to exit, then kills it.
    /// Returns true if it exited by itself.
    bool stop(steady::time_point deadline) {
        while (running()) {
            if (steady::now() >= deadline) {
                ::kill(pid_, SIGKILL);
                int status = 0;
                while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
                }
                pid_ = -1;
                return false;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        return true;
    }

    /// What QEMU wrote to stdout and stderr so far.
    std::string log() const {
        std::ifstream in(log_);
        std::ostringstream s;
        s << in.rdbuf();
        return s.str();
    }

private:
    pid_t pid_ = -1;
    int status_ = 0;
    std::filesystem::path log_;
};

/// A private temporary directory, removed with what it holds.
class temp_dir {
public:
    temp_dir() {
        std::string tmpl = (std::filesystem::temp_directory_path() / "mtree-XXXXXX").string();
        if (!::mkdtemp(tmpl.data())) throw capture_error(fmt::format("mkdtemp: {}", std::strerror(errno)));
        path_ = tmpl;
    }
    ~temp_dir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    temp_dir(const temp_dir&) = delete;
    temp_dir& operator=(const temp_dir&) = delete;
    const std::filesystem::path& path() const noexcept { return path_; }

private:
    std::filesystem::path path_;
};

} // namespace mtree_tool

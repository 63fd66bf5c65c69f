// ServerProcess: the real diffusion-server binary as a child process on loopback, for tests that
// drive it end to end (header-only; tests only).
//
// The test target defines DS_SERVER_PATH (the binary, `$<TARGET_FILE:diffusion-server>`).
// Thread-compatible: one thread owns an instance.
#pragma once

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "testing/test_util.h"

namespace ds::test {

class ServerProcess {
 public:
  // Starts DS_SERVER_PATH with `args` (plus --port=0 --metrics_port=0 --host=127.0.0.1
  // --threads=1 --embedded_models=default (the bare transformer only) --embedded_dir=<a temporary
  // folder>; later flags in `args` win) and waits up to 60 s for its "listening on" line.
  // ok() is false if it never came (the process is still killed on destruction); the server's
  // stderr is kept in a temporary file (Stderr()).
  explicit ServerProcess(std::vector<std::string> args) {
    err_path_ = tmp_.File("stderr.txt");
    args.insert(args.begin(), {DS_SERVER_PATH, "--port=0", "--metrics_port=0", "--host=127.0.0.1",
                               "--threads=1", "--embedded_models=default",
                               "--embedded_dir=" + tmp_.File("embedded")});
    // Everything the child needs is prepared before fork(): between fork and exec only
    // async-signal-safe calls (the test process has gRPC threads).
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int out[2];
    if (pipe(out) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], STDOUT_FILENO);
      const int err = open(err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (err >= 0) dup2(err, STDERR_FILENO);
      close(out[0]);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(out[1]);
    out_fd_ = out[0];
    std::string buffer;
    const auto start = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - start < std::chrono::seconds(60)) {
      pollfd p{out_fd_, POLLIN, 0};
      if (poll(&p, 1, 200) <= 0) continue;
      char buf[512];
      const ssize_t n = read(out_fd_, buf, sizeof(buf));
      if (n <= 0) break;
      buffer.append(buf, static_cast<size_t>(n));
      size_t eol;
      while ((eol = buffer.find('\n')) != std::string::npos) {
        const std::string line = buffer.substr(0, eol);
        buffer.erase(0, eol + 1);
        const int port = std::atoi(line.substr(line.rfind(':') + 1).c_str());
        if (absl::StartsWith(line, "metrics on ")) metrics_port_ = port;
        if (absl::StartsWith(line, "listening on ")) {
          port_ = port;
          return;
        }
      }
    }
  }
  // Kills the process (SIGKILL) unless WaitExit() saw it exit.
  ~ServerProcess() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) close(out_fd_);
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  pid_t pid() const { return pid_; }  // -1 if fork failed
  bool ok() const { return port_ > 0; }
  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  // "127.0.0.1:<port>".
  std::string target() const { return absl::StrCat("127.0.0.1:", port_); }
  std::string Stderr() const { return ReadFileBytes(err_path_); }

  // An insecure channel with a 64 MiB receive limit and its own connection.
  std::shared_ptr<grpc::Channel> NewChannel() const {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    // A fresh connection per channel (no sharing between the test's channels).
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    return grpc::CreateCustomChannel(target(), grpc::InsecureChannelCredentials(), args);
  }
  std::unique_ptr<diffusion::v1::DiffusionService::Stub> Stub() const {
    return diffusion::v1::DiffusionService::NewStub(NewChannel());
  }

  void Signal(int sig) const { kill(pid_, sig); }
  // The exit code, or -1 if it did not exit normally within `seconds`.
  int WaitExit(double seconds) {
    const auto start = std::chrono::steady_clock::now();
    while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() <
           seconds) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }

 private:
  TempDir tmp_;
  std::string err_path_;
  pid_t pid_ = -1;
  int out_fd_ = -1;
  int port_ = 0;
  int metrics_port_ = 0;
  bool exited_ = false;
};

}  // namespace ds::test

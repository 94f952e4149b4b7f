#pragma once
/// @file status.hpp
/// Errors as values: Status and Result<T>. No exceptions cross any moex public function.

#include <cstdint>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#include "moex/version.hpp"

MOEX_NAMESPACE_BEGIN

/// Error categories. Values are pinned: the C API exposes them unchanged.
enum class StatusCode : std::int32_t {
  kOk = 0,
  kInvalidArgument = -1,  ///< the caller passed something malformed or out of range
  kUnsupported = -2,      ///< a valid request this build or backend cannot serve
  kStructSize = -3,       ///< a C params struct from a newer header with a non-zero tail
  kOutOfMemory = -4,      ///< an allocation failed
  kIo = -5,               ///< a file could not be opened, read or written
  kCorrupt = -6,          ///< a file or stream is malformed (bad header, offsets out of range...)
  kNotFound = -7,         ///< a named tensor, key or file does not exist
  kInternal = -99,        ///< a bug in moex
};

/// Static text for a code; never null.
constexpr std::string_view to_string(StatusCode code) noexcept {
  switch (code) {
    case StatusCode::kOk:
      return "ok";
    case StatusCode::kInvalidArgument:
      return "invalid argument";
    case StatusCode::kUnsupported:
      return "unsupported";
    case StatusCode::kStructSize:
      return "struct size";
    case StatusCode::kOutOfMemory:
      return "out of memory";
    case StatusCode::kIo:
      return "I/O error";
    case StatusCode::kCorrupt:
      return "corrupt input";
    case StatusCode::kNotFound:
      return "not found";
    case StatusCode::kInternal:
      return "internal error";
  }
  return "unknown status";
}

/// A status code plus a human-readable message (empty on success).
class [[nodiscard]] Status {
 public:
  Status() noexcept = default;
  Status(StatusCode code, std::string message) noexcept : code_(code) {
    // Message copies may fail under memory pressure; the code still tells the story.
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    try {
      message_ = std::move(message);
    } catch (...) {
    }
#else
    message_ = std::move(message);
#endif
  }

  static Status ok() noexcept { return {}; }

  bool is_ok() const noexcept { return code_ == StatusCode::kOk; }
  explicit operator bool() const noexcept { return is_ok(); }
  StatusCode code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }
  /// "<code text>: <message>".
  std::string to_string() const {
    std::string s(moex::to_string(code_));
    if (!message_.empty()) s.append(": ").append(message_);
    return s;
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

/// Shorthands that read well at the call site: `return invalid_argument("k must be > 0");`
inline Status invalid_argument(std::string m) noexcept { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status unsupported(std::string m) noexcept { return {StatusCode::kUnsupported, std::move(m)}; }
inline Status io_error(std::string m) noexcept { return {StatusCode::kIo, std::move(m)}; }
inline Status corrupt(std::string m) noexcept { return {StatusCode::kCorrupt, std::move(m)}; }
inline Status not_found(std::string m) noexcept { return {StatusCode::kNotFound, std::move(m)}; }
inline Status internal_error(std::string m) noexcept { return {StatusCode::kInternal, std::move(m)}; }
inline Status out_of_memory(std::string m) noexcept { return {StatusCode::kOutOfMemory, std::move(m)}; }

/// A value or the Status that explains its absence (std::expected is not available to clang 14
/// with libstdc++ 12, nor to nvcc, here).
template <class T>
class [[nodiscard]] Result {
  static_assert(!std::is_same_v<std::remove_cv_t<T>, Status>, "Result<Status> is meaningless");

 public:
  Result(T value) noexcept(std::is_nothrow_move_constructible_v<T>)  // NOLINT(google-explicit-constructor)
      : v_(std::in_place_index<0>, std::move(value)) {}
  Result(Status status) noexcept  // NOLINT(google-explicit-constructor)
      : v_(std::in_place_index<1>, std::move(status)) {
    if (std::get<1>(v_).is_ok()) std::get<1>(v_) = internal_error("Result built from an ok Status");
  }

  bool is_ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return is_ok(); }

  /// Precondition: is_ok().
  T& value() & noexcept { return *std::get_if<0>(&v_); }
  const T& value() const& noexcept { return *std::get_if<0>(&v_); }
  T&& value() && noexcept { return std::move(*std::get_if<0>(&v_)); }
  T* operator->() noexcept { return std::get_if<0>(&v_); }
  const T* operator->() const noexcept { return std::get_if<0>(&v_); }
  T& operator*() & noexcept { return value(); }
  const T& operator*() const& noexcept { return value(); }

  /// The error; Status::ok() when a value is held.
  Status status() const {
    if (is_ok()) return Status::ok();
    return *std::get_if<1>(&v_);
  }

 private:
  std::variant<T, Status> v_;
};

MOEX_NAMESPACE_END

/// Propagates a non-ok Status out of the current function (the preprocessor is the only way to
/// return from the caller).
#define MOEX_RETURN_IF_ERROR(expr)                          \
  do {                                                      \
    ::moex::Status moex_status_tmp_ = (expr);               \
    if (!moex_status_tmp_.is_ok()) return moex_status_tmp_; \
  } while (0)

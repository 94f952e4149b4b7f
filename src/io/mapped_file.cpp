#include "moex/io/mapped_file.hpp"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>

MOEX_NAMESPACE_BEGIN

MappedFile::MappedFile(MappedFile&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)), path_(std::move(o.path_)) {}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    if (data_ && size_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    path_ = std::move(o.path_);
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (data_ && size_) ::munmap(const_cast<std::byte*>(data_), size_);
}

Result<MappedFile> MappedFile::open(const std::filesystem::path& path) noexcept {
  try {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return io_error("cannot open " + path.string() + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int e = errno;
      ::close(fd);
      return io_error("cannot stat " + path.string() + ": " + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      return io_error(path.string() + " is not a regular file");
    }
    MappedFile f;
    f.path_ = path;
    f.size_ = static_cast<std::size_t>(st.st_size);
    if (f.size_ > 0) {
      void* p = ::mmap(nullptr, f.size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int e = errno;
        ::close(fd);
        f.size_ = 0;
        return io_error("cannot map " + path.string() + ": " + std::strerror(e));
      }
      f.data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);
    return f;
  } catch (const std::bad_alloc&) {
    return out_of_memory("mapping " + path.string());
  }
}

Result<std::string> read_text_file(const std::filesystem::path& path, std::size_t max_bytes) noexcept {
  try {
    auto m = MappedFile::open(path);
    if (!m) return m.status();
    if (m->size() > max_bytes) {
      return corrupt(path.string() + ": " + std::to_string(m->size()) + " bytes, more than the " +
                     std::to_string(max_bytes) + " allowed");
    }
    const auto b = m->bytes();
    return std::string(reinterpret_cast<const char*>(b.data()), b.size());
  } catch (const std::bad_alloc&) {
    return out_of_memory("reading " + path.string());
  }
}

MOEX_NAMESPACE_END

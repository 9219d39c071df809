// qcowmap — what kind of file an image is, and the names of qcow2 header extensions.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/result.hpp>

#include <cstdint>
#include <filesystem>
#include <string>

namespace qcowmap {

/// Header extension types (spec "Header extensions"; qemu's block/qcow2.c QCOW2_EXT_MAGIC_*).
inline constexpr std::uint32_t kExtensionBackingFormat = 0xe2792aca;
inline constexpr std::uint32_t kExtensionFeatureNames = 0x6803f857;
inline constexpr std::uint32_t kExtensionBitmaps = 0x23852875;
inline constexpr std::uint32_t kExtensionEncryption = 0x0537be77;
inline constexpr std::uint32_t kExtensionDataFile = 0x44415441;

/// What a header extension type is called, as `info` lists it: "backing file format",
/// "feature name table", "bitmaps", "full disk encryption header", "external data file", else
/// "unknown (0x12345678)".
std::string header_extension_name(std::uint32_t type);

/// The format of the file at `path` as qemu probes it when none is given: "qcow2" when it
/// starts with the qcow magic ("QFI\xfb", qcow2 and qcow version 1 alike), else "raw" (qemu's
/// fallback; an empty file is raw too). The value suits `OpenOptions::format`.
/// Errors: io_error when the file cannot be opened or read (the message names the file).
Result<std::string> probe_format(const std::filesystem::path& path);

} // namespace qcowmap

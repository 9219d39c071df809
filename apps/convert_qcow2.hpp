// qcowmap convert -O qcow2: the command-line side of the qcow2 writer (qcowmap/writer.hpp).
#pragma once

#include "cli.hpp"

#include <memory>
#include <string>
#include <vector>

namespace qcowmap::cli {

/// The options only `convert -O qcow2` takes.
struct Qcow2ConvertArgs {
    bool compress = false;                ///< -c
    std::vector<std::string> create_opts; ///< -o (may be given more than once)
    std::string backing;                  ///< -B
    std::string backing_format;           ///< -F
};

/// Adds -c, -o, -B and -F to the convert command; they are refused without `-O qcow2`.
std::shared_ptr<Qcow2ConvertArgs> add_qcow2_options(CLI::App& command);

/// True when any of the options above was given (so a raw convert can refuse them).
bool qcow2_options_given(const Qcow2ConvertArgs& args);

/// Runs `convert -O qcow2 SOURCE TARGET|-`: `bitmap` (may be empty) selects the dirty ranges
/// of an incremental image, `target` "-" writes to stdout. Returns the exit code.
int convert_qcow2(const ImageArgs& source, const Qcow2ConvertArgs& args, const std::string& bitmap,
                  const std::string& target, bool force, bool progress);

} // namespace qcowmap::cli

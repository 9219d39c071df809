// qcowmap check: a read-only consistency check with qemu-img check's counts and exit codes.
#include "cli.hpp"

#include <qcowmap/check.hpp>

#include <fmt/format.h>

#include <unistd.h>

namespace qcowmap::cli {
namespace {

// Exit codes of `qemu-img check` (docs/tools/qemu-img.rst), kept for drop-in use.
constexpr int kCheckClean = 0;
constexpr int kCheckFailed = 1;
constexpr int kCheckUnsupported = 63;

/// With -r, the repair's counters follow qemu's (ImageCheck's leaks-fixed, corruptions-fixed).
std::string json_report(const std::string& path, const CheckResult& r,
                        const RepairResult* repair = nullptr) {
    std::string fixed;
    if (repair) {
        fixed = fmt::format(",\n    \"leaks-fixed\": {},\n    \"corruptions-fixed\": {}",
                            repair->leaks_fixed, repair->corruptions_fixed);
    }
    // qemu-img check --output=json's keys (QAPI ImageCheck); qemu omits zero counters, we
    // print every one so that scripts need no defaults.
    return fmt::format("{{\n"
                       "    \"filename\": {},\n"
                       "    \"format\": \"qcow2\",\n"
                       "    \"check-errors\": {},\n"
                       "    \"image-end-offset\": {},\n"
                       "    \"corruptions\": {},\n"
                       "    \"leaks\": {},\n"
                       "    \"total-clusters\": {},\n"
                       "    \"allocated-clusters\": {},\n"
                       "    \"fragmented-clusters\": {},\n"
                       "    \"compressed-clusters\": {}{}\n"
                       "}}\n",
                       json_string(path), r.check_errors, r.image_end_offset, r.corruptions,
                       r.leaks, r.total_clusters, r.allocated_clusters, r.fragmented_clusters,
                       r.compressed_clusters, fixed);
}

std::string human_report(const CheckResult& r) {
    // Worded like qemu-img's dump_human_image_check.
    std::string out;
    if (r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0) {
        out += "No errors were found on the image.\n";
    } else {
        if (r.corruptions) {
            out += fmt::format("\n{} errors were found on the image.\nData may be corrupted, or "
                               "further writes to the image may corrupt it.\n",
                               r.corruptions);
        }
        if (r.leaks) {
            out += fmt::format("\n{} leaked clusters were found on the image.\nThis means waste "
                               "of disk space, but no harm to data.\n",
                               r.leaks);
        }
        if (r.check_errors) {
            out += fmt::format("\n{} internal errors have occurred during the check.\n",
                               r.check_errors);
        }
    }
    if (r.total_clusters != 0 && r.allocated_clusters != 0) {
        const double allocated = static_cast<double>(r.allocated_clusters);
        out += fmt::format("{}/{} = {:.2f}% allocated, {:.2f}% fragmented, {:.2f}% compressed "
                           "clusters\n",
                           r.allocated_clusters, r.total_clusters,
                           allocated * 100.0 / static_cast<double>(r.total_clusters),
                           static_cast<double>(r.fragmented_clusters) * 100.0 / allocated,
                           static_cast<double>(r.compressed_clusters) * 100.0 / allocated);
    }
    if (r.image_end_offset) {
        out += fmt::format("Image end offset: {}\n", r.image_end_offset);
    }
    return out;
}

void write_stderr(const std::vector<std::string>& lines, std::uint64_t dropped) {
    std::string text;
    for (const std::string& line : lines)
        text += line + "\n";
    if (dropped)
        text += fmt::format("... and {} more findings\n", dropped);
    if (!text.empty()) {
        ssize_t ignored = ::write(STDERR_FILENO, text.data(), text.size());
        (void)ignored;
    }
}

/// `check -r leaks|all`: repair, then report as qemu-img check -r does (img_check): the lines
/// of the repair on stderr, "The following inconsistencies were found and repaired" and the
/// double check's report on stdout, the exit status of the state after the repair.
int run_repair(const std::string& path, const std::string& mode, bool untrusted, bool json) {
    RepairOptions options;
    options.mode = mode == "all" ? RepairMode::all : RepairMode::leaks;
    options.untrusted = untrusted;
    auto result = repair_image(std::filesystem::path(path), options);
    if (!result) {
        // qemu-img check -r prints "Check failed: ..." and exits 1 when the check or the
        // repair cannot be done.
        return report_error(path, result.error(), kCheckFailed, ImageAccess::write);
    }
    const RepairResult& r = *result;
    write_stderr(r.messages, r.messages_dropped);
    const bool fixed = r.leaks_fixed || r.corruptions_fixed;
    std::string out;
    if (fixed && !json) {
        out += fmt::format("The following inconsistencies were found and repaired:\n\n"
                           "    {} leaked clusters\n"
                           "    {} corruptions\n\n"
                           "Double checking the fixed image now...\n",
                           r.leaks_fixed, r.corruptions_fixed);
    }
    if (r.double_checked)
        write_stderr(r.after.messages, r.after.messages_dropped);
    out += json ? json_report(path, r.after, &r) : human_report(r.after);
    std::fwrite(out.data(), 1, out.size(), stdout);
    if (int code = finish_stdout(); code != kExitOk)
        return code;
    return r.exit_code() == 0 ? kCheckClean : r.exit_code();
}

} // namespace

Command add_check(CLI::App& app) {
    auto* command = app.add_subcommand(
        "check", "Check the image's reference counts (qemu-img check's counts; exit 0 clean, 2 "
                 "corruptions, 3 leaks only, 1 could not check); with -r, repair them in place "
                 "first (the exit status is then that of the repaired image)");
    auto path = std::make_shared<std::string>();
    auto output = std::make_shared<OutputOption>();
    auto untrusted = std::make_shared<bool>(false);
    auto force_share = std::make_shared<bool>(false);
    auto format = std::make_shared<std::string>();
    auto repair = std::make_shared<std::string>();
    command->add_option("IMAGE", *path, "The qcow2 image file (or block device)")->required();
    command
        ->add_option("-f,--format", *format,
                     "Format of the image: qcow2 (qcow version 1 too) or raw; default: probed "
                     "as qemu-img does")
        ->check(one_of({"qcow2", "qcow", "raw"}))
        ->option_text("FMT");
    command
        ->add_option("-r,--repair", *repair,
                     "Repair in place, as qemu-img check -r: 'leaks' lowers refcounts higher "
                     "than the references (frees leaked clusters); 'all' also raises refcounts "
                     "lower than the references, rebuilds a damaged refcount structure, rewrites "
                     "OFLAG_COPIED flags and clears the dirty bit of an image qemu left with lazy "
                     "refcounts. Takes QEMU's writer lock. Damage qemu repairs by rewriting L1/L2 "
                     "entries or the snapshot table is refused before anything is written")
        ->check(one_of({"leaks", "all"}))
        ->option_text("leaks|all");
    output->add_to(*command, "the counts with qemu-img check --output=json's keys");
    add_untrusted_option(*command, *untrusted);
    add_force_share_option(*command, *force_share);
    auto stream = std::make_shared<StreamArgs>();
    stream->add_to(*command);
    return {command, [=] {
                if (*path == "-") { // read from standard input (apps/stream_input.cpp)
                    ImageArgs source;
                    source.path = "-";
                    return describe_stream(source, *stream, output->json(), true);
                }
                if (!repair->empty() && (*force_share || stream->given()))
                    throw UsageError("-r writes the image: it goes with neither -U nor standard "
                                     "input");
                if (stream->given())
                    throw UsageError("--max-spool, --expect-checksum and --stream-stats need - "
                                     "(standard input) as the image");
                (void)output->json(); // --json --output=human: a usage error, before reading
                // No warning: a raw image is refused here anyway, in one line as qemu-img check
                // does.
                const std::string probed =
                    format->empty() ? probe_image_format(*path, false, false) : *format;
                if (probed == "raw") {
                    // qemu-img check: "This image format does not support checks", 63.
                    return report(*path, "This image format does not support checks",
                                  kCheckUnsupported);
                }
                if (!repair->empty()) {
                    if (probed == "qcow") {
                        return report(*path,
                                      "qcow version 1 images keep no reference counts: nothing "
                                      "to repair",
                                      kCheckFailed);
                    }
                    guard_against_shrinking(*path);
                    return run_repair(*path, *repair, *untrusted, output->json());
                }
                guard_against_shrinking(*path);
                CheckOptions options;
                options.untrusted = *untrusted;
                options.force_share = *force_share;
                auto result = check_image(std::filesystem::path(*path), options);
                if (!result) {
                    Error error = result.error();
                    if (error.code == ErrorCode::not_qcow2 && !format->empty())
                        error.message += " (use -f raw for a raw image)";
                    return report_error(*path, error, kCheckFailed);
                }
                const CheckResult& r = *result;
                // Findings go to stderr, one line each, as qemu-img prints them.
                std::string findings;
                for (const std::string& line : r.messages)
                    findings += line + "\n";
                if (r.messages_dropped) {
                    findings += fmt::format("... and {} more findings\n", r.messages_dropped);
                }
                if (!findings.empty()) {
                    ssize_t ignored = ::write(STDERR_FILENO, findings.data(), findings.size());
                    (void)ignored;
                }
                const std::string out = output->json() ? json_report(*path, r) : human_report(r);
                std::fwrite(out.data(), 1, out.size(), stdout);
                if (int code = finish_stdout(); code != kExitOk)
                    return code;
                if (r.check_errors) {
                    report(*path, "check failed: some reference counts could not be read",
                           kCheckFailed);
                }
                return r.exit_code() == 0 ? kCheckClean : r.exit_code();
            }};
}

} // namespace qcowmap::cli

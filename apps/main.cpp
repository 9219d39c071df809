// qcowmap: read qcow2 images through a memory mapping.
#include "cli.hpp"

#include <cctype>
#include <cstring>
#include <new>
#include <system_error>
#include <vector>

namespace {

using namespace qcowmap::cli;

/// The subcommand the command line names: its first argument that is not an option.
/// (CLI11 stops at the first error, before it marks a subcommand as parsed.)
std::string named_command(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        if (argv[i][0] != '-')
            return argv[i];
    }
    return {};
}

int usage(const std::string& command, const std::string& message) {
    const std::string help = command.empty() ? "qcowmap --help" : "qcowmap " + command + " --help";
    return report("usage", message + " (see " + help + ")", kExitUsage);
}

/// `qemu-img resize IMAGE -1G` takes its last argument as the size even when it starts with a
/// dash (qemu-img.c img_resize removes it before getopt); so does `qcowmap resize`, by putting
/// "--" before a last argument that looks like a negative size.
std::vector<char*> with_negative_size(int argc, char** argv, const std::string& command) {
    std::vector<char*> args(argv, argv + argc);
    static char separator[] = "--";
    if (command == "resize" && argc >= 3) {
        const char* last = argv[argc - 1];
        const bool negative =
            last[0] == '-' && (std::isdigit(static_cast<unsigned char>(last[1])) || last[1] == '.');
        bool separated = false;
        for (int i = 1; i < argc - 1; ++i)
            separated = separated || std::strcmp(argv[i], "--") == 0;
        if (negative && !separated)
            args.insert(args.end() - 1, separator);
    }
    return args;
}

} // namespace

int main(int argc, char** argv) {
    CLI::App app{"qcowmap: read qcow2 disk images through a memory mapping, without copying.\n"
                 "Exit codes: 0 success, 1 image error, 2 usage error, 3 output error, 4 data lost "
                 "(--salvage)."};
    app.name("qcowmap");
    app.require_subcommand(1);
    app.set_version_flag("--version", "qcowmap " + std::string(qcowmap::version()));
    const Command commands[] = {
        add_info(app),   add_map(app),     add_cat(app),    add_convert(app), add_bitmaps(app),
        add_hash(app),   add_compare(app), add_check(app),  add_mount(app),   add_create(app),
        add_resize(app), add_bitmap(app),  add_commit(app), add_rebase(app)};
    std::string command = named_command(argc, argv);
    bool known = false;
    for (const Command& c : commands)
        known = known || c.parser->get_name() == command;
    if (!command.empty() && !known) {
        return usage("", "unknown command '" + printable(command) + "'");
    }
    std::vector<char*> args = with_negative_size(argc, argv, command);
    try {
        app.parse(static_cast<int>(args.size()), args.data());
    } catch (const CLI::ParseError& e) {
        if (e.get_exit_code() == 0) {
            return app.exit(e); // --help, --version
        }
        // One line, like every other error.
        return usage(command, e.what());
    }
    for (const Command& c : commands) {
        if (c.parser->parsed()) {
            try {
                int code = c.run();
                return code == kExitOk ? finish_stdout() : code;
            } catch (const UsageError& e) {
                return usage(c.parser->get_name(), e.what());
            } catch (const std::system_error& e) {
                return report("<stdout>", e.what(), kExitOutputError); // fmt::print failed
            } catch (const std::bad_alloc&) {
                // Out of memory outside the library's own checks (a buffer the CLI sizes, a
                // message): one line, never std::bad_alloc's text.
                return report(c.parser->get_name(), "out of memory", kExitImageError);
            } catch (const std::exception& e) {
                return report(c.parser->get_name(), e.what(), kExitImageError);
            }
        }
    }
    return kExitUsage;
}

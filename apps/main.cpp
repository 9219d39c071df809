// qcowmap: read qcow2 images through a memory mapping.
#include "cli.hpp"

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <new>
#include <string_view>
#include <system_error>
#include <unistd.h>
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

/// A standard descriptor the caller closed (`cat IMG >&-`) is opened on /dev/null the wrong way
/// round (read-only for 1 and 2, write-only for 0): the number cannot be taken by a file we
/// open later (the image itself, whose "output" would then be refused as overwriting it), and
/// using it fails with EBADF as the closed descriptor would.
void hold_closed_standard_descriptors() {
    for (int fd : {STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO}) {
        if (::fcntl(fd, F_GETFD) == -1 && errno == EBADF)
            (void)::open("/dev/null", (fd == STDIN_FILENO ? O_WRONLY : O_RDONLY) | O_CLOEXEC);
    }
}

/// `--start-offset=` with nothing after `=`: CLI11 would take the next argument as its value
/// (and then report IMAGE missing). Name the option instead.
std::string empty_option_value(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg = argv[i];
        if (arg == "--")
            break;
        if (arg.starts_with("--") && arg.size() > 3 && arg.back() == '=')
            return std::string(arg.substr(0, arg.size() - 1));
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

/// CLI11's "The following arguments were not expected: --bogus x" in qemu-img's words:
/// "unrecognized option '--bogus'", "unexpected argument 'x'".
std::string extras_message(const std::string& what) {
    const std::size_t colon = what.find(": ");
    if (colon == std::string::npos)
        return what;
    std::string out;
    std::size_t at = colon + 2;
    while (at < what.size()) {
        std::size_t space = what.find(' ', at);
        if (space == std::string::npos)
            space = what.size();
        const std::string word = what.substr(at, space - at);
        at = space + 1;
        if (word.empty())
            continue;
        out += out.empty() ? "" : ", ";
        out += word.size() > 1 && word[0] == '-' ? "unrecognized option '" + printable(word) + "'"
                                                 : "unexpected argument '" + printable(word) + "'";
    }
    return out.empty() ? what : out;
}

} // namespace

int main(int argc, char** argv) {
    CLI::App app{"qcowmap: read qcow2 disk images through a memory mapping, without copying.\n"
                 "Exit codes: 0 success, 1 image or usage error (as qemu-img), 3 output error, "
                 "4 data lost (--salvage); check and compare use qemu-img's own codes."};
    app.name("qcowmap");
    app.require_subcommand(1);
    app.set_version_flag("-v,-V,--version", "qcowmap " + std::string(qcowmap::version()));
    const Command commands[] = {
        add_info(app),   add_map(app),     add_cat(app),    add_convert(app), add_bitmaps(app),
        add_hash(app),   add_compare(app), add_check(app),  add_mount(app),   add_create(app),
        add_resize(app), add_bitmap(app),  add_commit(app), add_rebase(app)};
    hold_closed_standard_descriptors();
    std::string command = named_command(argc, argv);
    if (std::string option = empty_option_value(argc, argv); !option.empty()) {
        return usage(command, option + ": a value is required after '=' (it is empty)");
    }
    if (command == "help") {
        // `qcowmap help [COMMAND]`: the same text as --help.
        std::string topic;
        for (int i = 1; i < argc; ++i) {
            if (std::strcmp(argv[i], "help") != 0 && argv[i][0] != '-') {
                topic = argv[i];
                break;
            }
        }
        for (const Command& c : commands) {
            if (c.parser->get_name() == topic) {
                std::fputs(c.parser->help().c_str(), stdout);
                return finish_stdout();
            }
        }
        if (!topic.empty())
            return usage("", "unknown command '" + printable(topic) + "'");
        std::fputs(app.help().c_str(), stdout);
        return finish_stdout();
    }
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
        if (dynamic_cast<const CLI::ExtrasError*>(&e))
            return usage(command, extras_message(e.what()));
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

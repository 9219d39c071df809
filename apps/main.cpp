// qcowmap: read qcow2 images through a memory mapping.
#include "cli.hpp"

#include <system_error>

int main(int argc, char** argv) {
    using namespace qcowmap::cli;
    CLI::App app{"qcowmap: read qcow2 disk images through a memory mapping, without copying.\n"
                 "Exit codes: 0 success, 1 image error, 2 usage error, 3 output error."};
    app.name("qcowmap");
    app.require_subcommand(1);
    app.set_version_flag("--version", "qcowmap " + std::string(qcowmap::version()));
    const Command commands[] = {add_info(app),    add_map(app),  add_cat(app),     add_convert(app),
                                add_bitmaps(app), add_hash(app), add_compare(app), add_check(app)};
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        if (e.get_exit_code() == 0) {
            return app.exit(e); // --help, --version
        }
        // One line, like every other error.
        return report("usage", std::string(e.what()) + " (see qcowmap --help)", kExitUsage);
    }
    for (const Command& command : commands) {
        if (command.parser->parsed()) {
            try {
                int code = command.run();
                return code == kExitOk ? finish_stdout() : code;
            } catch (const std::system_error& e) {
                return report("<stdout>", e.what(), kExitOutputError); // fmt::print failed
            } catch (const std::exception& e) {
                return report(command.parser->get_name(), e.what(), kExitImageError);
            }
        }
    }
    return kExitUsage;
}

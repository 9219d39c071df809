// qcowmap: read qcow2 images through a memory mapping.
#include "cli.hpp"

int main(int argc, char** argv) {
    using namespace qcowmap::cli;
    CLI::App app{"qcowmap: read qcow2 disk images through a memory mapping, without copying.\n"
                 "Exit codes: 0 success, 1 image error, 2 usage error, 3 output error."};
    app.name("qcowmap");
    app.require_subcommand(1);
    app.set_version_flag("--version", "qcowmap 0.1.0");
    const Command commands[] = {add_info(app), add_map(app), add_cat(app), add_convert(app)};
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? kExitOk : kExitUsage;
    }
    for (const Command& command : commands) {
        if (command.parser->parsed()) {
            return command.run();
        }
    }
    return kExitUsage;
}

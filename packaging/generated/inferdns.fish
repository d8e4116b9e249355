# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_inferdns_global_optspecs
    string join \n log-format= h/help V/version
end

function __fish_inferdns_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_inferdns_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_inferdns_using_subcommand
    set -l cmd (__fish_inferdns_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c inferdns -n "__fish_inferdns_needs_command" -l log-format -d 'Log line format on stderr' -r -f -a "text\t''
json\t''"
complete -c inferdns -n "__fish_inferdns_needs_command" -s h -l help -d 'Print help'
complete -c inferdns -n "__fish_inferdns_needs_command" -s V -l version -d 'Print version'
complete -c inferdns -n "__fish_inferdns_needs_command" -f -a "run" -d 'Run the daemon'
complete -c inferdns -n "__fish_inferdns_needs_command" -f -a "check" -d 'Load and check a configuration without serving; exit 0 if it is good, 1 if not'
complete -c inferdns -n "__fish_inferdns_needs_command" -f -a "status" -d 'Show a running daemon\'s regions, endpoints and service decisions'
complete -c inferdns -n "__fish_inferdns_needs_command" -f -a "explain" -d 'Ask a running daemon why a service answers what it answers'
complete -c inferdns -n "__fish_inferdns_needs_command" -f -a "demo" -d 'Start simulated regions and the server on loopback and show failover and failback'
complete -c inferdns -n "__fish_inferdns_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c inferdns -n "__fish_inferdns_using_subcommand run" -l config -d 'Main configuration file' -r -F
complete -c inferdns -n "__fish_inferdns_using_subcommand run" -l dns-listen -d 'Serve DNS (UDP and TCP) on this address instead of the config\'s (port 0: any free port)' -r
complete -c inferdns -n "__fish_inferdns_using_subcommand run" -l admin-listen -d 'Serve the admin API on this address instead of the config\'s (port 0: any free port)' -r
complete -c inferdns -n "__fish_inferdns_using_subcommand run" -l log-format -d 'Log line format on stderr' -r -f -a "text\t''
json\t''"
complete -c inferdns -n "__fish_inferdns_using_subcommand run" -s h -l help -d 'Print help'
complete -c inferdns -n "__fish_inferdns_using_subcommand check" -l config -r -F
complete -c inferdns -n "__fish_inferdns_using_subcommand check" -l log-format -d 'Log line format on stderr' -r -f -a "text\t''
json\t''"
complete -c inferdns -n "__fish_inferdns_using_subcommand check" -s h -l help -d 'Print help'
complete -c inferdns -n "__fish_inferdns_using_subcommand status" -l admin -d 'The daemon\'s admin API address [default: `[server] admin-listen` of --config]' -r
complete -c inferdns -n "__fish_inferdns_using_subcommand status" -l config -d 'The daemon\'s configuration file, for its admin address and token [default: /etc/inferdns/inferdns.toml, read unless --admin is given]' -r -F
complete -c inferdns -n "__fish_inferdns_using_subcommand status" -l log-format -d 'Log line format on stderr' -r -f -a "text\t''
json\t''"
complete -c inferdns -n "__fish_inferdns_using_subcommand status" -s h -l help -d 'Print help'
complete -c inferdns -n "__fish_inferdns_using_subcommand explain" -l name -d 'The service, as a flag (same as SERVICE)' -r
complete -c inferdns -n "__fish_inferdns_using_subcommand explain" -l client -d 'The client (resolver) address to explain the answer for' -r
complete -c inferdns -n "__fish_inferdns_using_subcommand explain" -l ecs -d 'An EDNS Client Subnet to explain the answer for, e.g. 203.0.113.0/24' -r
complete -c inferdns -n "__fish_inferdns_using_subcommand explain" -l admin -d 'The daemon\'s admin API address [default: `[server] admin-listen` of --config]' -r
complete -c inferdns -n "__fish_inferdns_using_subcommand explain" -l config -d 'The daemon\'s configuration file, for its admin address and token [default: /etc/inferdns/inferdns.toml, read unless --admin is given]' -r -F
complete -c inferdns -n "__fish_inferdns_using_subcommand explain" -l log-format -d 'Log line format on stderr' -r -f -a "text\t''
json\t''"
complete -c inferdns -n "__fish_inferdns_using_subcommand explain" -s h -l help -d 'Print help'
complete -c inferdns -n "__fish_inferdns_using_subcommand demo" -l dns-listen -d 'DNS address of the demo server (port 0: any free port)' -r
complete -c inferdns -n "__fish_inferdns_using_subcommand demo" -l hold -d 'Keep everything running this many seconds afterwards, for dig' -r
complete -c inferdns -n "__fish_inferdns_using_subcommand demo" -l log-format -d 'Log line format on stderr' -r -f -a "text\t''
json\t''"
complete -c inferdns -n "__fish_inferdns_using_subcommand demo" -l json -d 'One JSON object per line for each event, and a summary last'
complete -c inferdns -n "__fish_inferdns_using_subcommand demo" -s h -l help -d 'Print help'
complete -c inferdns -n "__fish_inferdns_using_subcommand help; and not __fish_seen_subcommand_from run check status explain demo help" -f -a "run" -d 'Run the daemon'
complete -c inferdns -n "__fish_inferdns_using_subcommand help; and not __fish_seen_subcommand_from run check status explain demo help" -f -a "check" -d 'Load and check a configuration without serving; exit 0 if it is good, 1 if not'
complete -c inferdns -n "__fish_inferdns_using_subcommand help; and not __fish_seen_subcommand_from run check status explain demo help" -f -a "status" -d 'Show a running daemon\'s regions, endpoints and service decisions'
complete -c inferdns -n "__fish_inferdns_using_subcommand help; and not __fish_seen_subcommand_from run check status explain demo help" -f -a "explain" -d 'Ask a running daemon why a service answers what it answers'
complete -c inferdns -n "__fish_inferdns_using_subcommand help; and not __fish_seen_subcommand_from run check status explain demo help" -f -a "demo" -d 'Start simulated regions and the server on loopback and show failover and failback'
complete -c inferdns -n "__fish_inferdns_using_subcommand help; and not __fish_seen_subcommand_from run check status explain demo help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
